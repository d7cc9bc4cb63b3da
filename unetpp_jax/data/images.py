"""Reading any image Pillow reads (PNG, JPEG, TIFF, BMP, ...; 8 or 16 bit; grey, RGB, RGBA) the
way ``cv2.imread(path, IMREAD_COLOR)`` gives it to UNET-ZOO's model: HxWx3 uint8 **BGR**.

The pixel conversion is ``preprocess.py``'s (the one training and evaluation use):

* 16-bit images keep the high byte, ``v >> 8`` (= ``floor(v / 256)``). Checked against OpenCV 5.0:
  identical for 16-bit grey and RGB PNGs (libpng's ``strip_16``) and 16-bit grey TIFFs; for
  16-bit *RGB* TIFFs OpenCV goes through libtiff's RGBA reader, which rounds ``v * 255 / 65535``
  instead, so some pixels differ by one grey level there;
* grey is replicated over the three channels; alpha is dropped, not composited (as OpenCV);
* palette and 1-bit images are expanded to RGB;
* the EXIF orientation is applied (``cv2.imread`` does so too, unless told not to);
* a multi-page TIFF gives its first page (as ``cv2.imread``).

JPEG decoders differ by a grey level here and there between libjpeg builds; PNG and TIFF are
exact.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from unetpp_jax.data.preprocess import PreprocessError, _uint8_pixels

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "as_bgr_uint8", "decode_image_bgr",
           "is_image_name", "read_image_bgr_any"]

#: File name endings that folder scans take as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".jp2")


class ImageReadError(PreprocessError):
    """An image file cannot be used; the message names the file and the problem."""


def is_image_name(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image_bgr(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Image bytes -> HxWx3 uint8 BGR (module doc); :class:`ImageReadError` names ``name``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError) or "cannot identify" in msg:
            msg = "not an image Pillow can read"
        elif "truncated" in msg.lower() or isinstance(e, (EOFError, SyntaxError)):
            msg = f"truncated or corrupt image data ({msg})"
        raise ImageReadError(f"{name}: {msg}") from e
    if img.width == 0 or img.height == 0:
        raise ImageReadError(f"{name}: the image is empty ({img.width}x{img.height})")
    try:
        rgb = _uint8_pixels(img, "RGB")
    except Exception as e:
        raise ImageReadError(f"{name}: cannot convert mode {img.mode} to RGB ({e})") from e
    return np.ascontiguousarray(rgb[..., ::-1])


def read_image_bgr_any(path) -> np.ndarray:
    """Read an image file as ``cv2.imread(path, IMREAD_COLOR)`` would (module doc)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a folder, not an image") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")
    return decode_image_bgr(data, name=str(path))


def as_bgr_uint8(image, channel_order: str = "BGR", *, name: str = "image") -> np.ndarray:
    """A numpy image -> HxWx3 uint8 BGR, with the reader's rules: ``(H, W)`` / ``(H, W, 1)`` grey
    replicated, ``(H, W, 4)`` alpha dropped, uint16 reduced to its high byte, ``channel_order``
    ("BGR" as ``cv2.imread``, "RGB" as Pillow) of the colour channels given. Float images are
    refused (their scale is ambiguous): convert them to uint8 first."""
    a = np.asarray(image)
    if channel_order not in ("BGR", "RGB"):
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 or uint16 pixels, got {a.dtype} (scale float "
                         "images to 0..255 and convert to uint8)")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                         f"shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if channel_order == "RGB":
        a = a[..., ::-1]
    return np.ascontiguousarray(a)
