"""The shipped recipe: UNET-ZOO's model and data, trained the way that works at 96x96.

Shuffled every epoch, batch 8, Adam 1e-3 with one warm-up epoch and cosine decay to 1e-5,
per head 0.5 BCE + soft Dice (pytorch-nested-unet's BCEDiceLoss), random flips and rot90, and an
exponential moving average of weights and BatchNorm statistics (decay 0.995, ~3 epochs) used for
validation and export, 36 epochs.

    python -m experiments.train --config strong --data ../shared/data/dsb2018/stage1_train --workdir runs/strong

Result: best epoch 32 of 36 (run stopped after epoch 33): validation MIoU 84.191 (head 4), fp16
84.184, int8-KL 84.155 (docs/evaluation.md says why that row moved by thousandths); these are
the bundled weights (docs/training.md).
"""

from unetpp_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(name="strong", batch_size=8, epochs=36, optimizer="adam",
                       learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0,
                       final_learning_rate=1e-5, bce_weight=0.5, dice_weight=1.0,
                       shuffle=True, augment=True, ema_decay=0.995)
