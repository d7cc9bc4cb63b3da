"""UNET-ZOO's recipe, reproduced in JAX.

Adam 1e-3 (betas 0.9/0.999, eps 1e-8, no weight decay, no schedule), loss = mean over the four
heads of BCE against the soft mask, 21 epochs, the split's fixed unshuffled order, no
augmentation, best-validation-MIoU checkpoint kept. Batch 8 instead of UNET-ZOO's default 1,
whose one-image BatchNorm statistics leave eval-mode MIoU near 0.09.

    python -m experiments.train --config unetzoo --data ../shared/data/dsb2018/stage1_train --workdir runs/unetzoo

Result (docs/training.md): at full width not run to the end here (34 minutes an epoch on the
2-core VM). At half width (``--set widths=16,32,64,128,256``) best epoch 6, validation MIoU
77.436 (head 4), the epochs swinging between 33 and 77; at a quarter (8..128) best epoch 17,
79.778.
"""

from unetpp_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(name="unetzoo", batch_size=8, epochs=21, optimizer="adam",
                       learning_rate=1e-3, schedule="constant", bce_weight=1.0, dice_weight=0.0,
                       shuffle=False, augment=False, ema_decay=0.0)
