"""DSB2018 as three classes (background, nucleus interior, nucleus boundary), a short recipe.

Softmax cross-entropy + soft Dice per head, shuffled, flips/rot90, Adam 1e-3 with cosine decay,
widths halved from UNET-ZOO's, 12 epochs at 96x96:

    python -m experiments.train --config dsb3class --data ../shared/data/dsb2018/stage1_train --workdir runs/dsb3class

Result: docs/data.md ("Three classes").
"""

from unetpp_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(name="dsb3class", dataset="dsb2018-3class", num_classes=3,
                       widths=(16, 32, 64, 128, 256), batch_size=8, epochs=12, optimizer="adam",
                       learning_rate=1e-3, schedule="cosine", warmup_epochs=0.5,
                       final_learning_rate=1e-5, bce_weight=1.0, dice_weight=1.0, shuffle=True,
                       augment=True)
