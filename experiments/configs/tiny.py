"""A seconds-long CPU run for tests and smoke checks: widths (4, 8, 16, 32, 64), 16 training
images, 4 steps per epoch, 3 epochs.

    python -m experiments.train --config tiny --data ../shared/data/dsb2018/stage1_train --workdir /tmp/tiny
"""

from unetpp_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(name="tiny", widths=(4, 8, 16, 32, 64), batch_size=4, epochs=3,
                       learning_rate=3e-3, schedule="constant", bce_weight=0.5, dice_weight=1.0,
                       shuffle=True, augment=True, max_steps_per_epoch=4, train_limit=16,
                       val_limit=8, eval_batch_size=8)
