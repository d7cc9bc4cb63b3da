"""How a model wants its input: channel order, mean and std, size -- recorded in every
checkpoint's metadata (``'input'``) and applied by evaluation, prediction and training alike.

    x = (pixel / 255 - mean[c]) / std[c]      per channel, in the model's channel order

UNET-ZOO's models (and this project's): BGR, mean 0.5, std 0.5, i.e. (x/255 - 0.5)/0.5.
Every image loader in this package returns BGR (as ``cv2.imread``); :meth:`InputSpec.normalize`
reorders to the model's order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

CHANNEL_ORDERS = ("BGR", "RGB")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model's input convention. ``size`` is the (height, width) it was trained at, if known."""

    channel_order: str = "BGR"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got "
                             f"{self.channel_order!r}")
        if len(self.mean) != len(self.std) or not all(s != 0 for s in self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must have one non-zero std "
                             "per channel")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def normalize(self, images_uint8_bgr) -> np.ndarray:
        """uint8 images (BGR for 3 channels, as every loader here returns) -> the model's float32
        input. UNET-ZOO's spec computes exactly ``(x / 255 - 0.5) / 0.5`` in float32."""
        x = np.asarray(images_uint8_bgr)
        if x.dtype != np.uint8:
            raise ValueError(f"normalize expects uint8 images, got {x.dtype}")
        uniform = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        if x.shape[-1] != self.channels and not uniform:
            raise ValueError(f"the model takes {self.channels}-channel images, got "
                             f"{x.shape[-1]} channels (shape {x.shape})")
        if self.channel_order == "RGB" and x.shape[-1] == 3:
            x = x[..., ::-1]
        # The same mean and std for every channel apply to any channel count.
        mean = np.asarray(self.mean[:1] if uniform else self.mean, np.float32)
        std = np.asarray(self.std[:1] if uniform else self.std, np.float32)
        return (x.astype(np.float32) / np.float32(255) - mean) / std

    def to_json(self) -> dict:
        d = {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std)}
        if self.size is not None:
            d["size"] = list(self.size)
        return d

    @classmethod
    def from_json(cls, d: Mapping | None, where: str = "metadata") -> "InputSpec":
        """The spec a checkpoint records (UNET-ZOO's when absent); bad fields raise ValueError
        naming ``where`` and the field."""
        if d is None:
            return UNETZOO_INPUT
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: 'input' must be an object, got {type(d).__name__}")
        try:
            order = d.get("channel_order", "BGR")
            mean = tuple(float(v) for v in d.get("mean", (0.5, 0.5, 0.5)))
            std = tuple(float(v) for v in d.get("std", (0.5, 0.5, 0.5)))
            size = d.get("size")
            if size is not None:
                size = tuple(int(v) for v in size)
                if len(size) != 2 or min(size) < 1:
                    raise ValueError(f"size must be [height, width], got {d.get('size')}")
            return cls(order, mean, std, size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid 'input' entry ({e})") from None


UNETZOO_INPUT = InputSpec()
IMAGENET_RGB_INPUT = InputSpec("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
