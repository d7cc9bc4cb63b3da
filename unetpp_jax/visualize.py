"""PNG panels for looking at predictions: image | ground truth | prediction per precision | where
precisions disagree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _gray(mask_bool: np.ndarray) -> np.ndarray:
    return np.repeat((mask_bool.astype(np.uint8) * 255)[..., None], 3, axis=-1)


def overlay_panel(image_bgr: np.ndarray, gt_mask_uint8: np.ndarray, preds: dict[str, np.ndarray],
                  *, scale: int = 2, gt_threshold: int = 125, threshold: float = 0.5) -> Image.Image:
    """One row: image (RGB), GT (>= 125), each precision's prediction (>= 0.5), and a
    disagreement map (red: pixels where the precisions' predictions differ)."""
    tiles = [("image", image_bgr[..., ::-1]), ("ground truth", _gray(gt_mask_uint8 >= gt_threshold))]
    binar = {name: p >= threshold for name, p in preds.items()}
    for name, b in binar.items():
        tiles.append((name, _gray(b)))
    if len(binar) > 1:
        stack = np.stack(list(binar.values()))
        differ = stack.any(0) & ~stack.all(0)
        base = _gray(stack[0]) // 3
        base[differ] = (255, 0, 0)
        tiles.append((f"differ ({int(differ.sum())} px)", base))
    h, w = image_bgr.shape[:2]
    label_h = 14
    panel = Image.new("RGB", (len(tiles) * (w * scale + 4), h * scale + label_h), "white")
    draw = ImageDraw.Draw(panel)
    for k, (name, arr) in enumerate(tiles):
        x0 = k * (w * scale + 4)
        tile = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).resize(
            (w * scale, h * scale), Image.NEAREST)
        panel.paste(tile, (x0, label_h))
        draw.text((x0 + 2, 1), name, fill="black")
    return panel


def save_overlays(out_dir, images_bgr, masks, ids, preds: dict[str, np.ndarray]) -> list[Path]:
    """Write ``<out_dir>/<id>.png`` for every image; ``preds[name]`` is ``(N, H, W)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image_id in enumerate(ids):
        path = out_dir / f"{image_id}.png"
        overlay_panel(images_bgr[i], masks[i], {k: v[i] for k, v in preds.items()}).save(path)
        paths.append(path)
    return paths
