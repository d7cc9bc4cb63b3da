"""Segment your images with a checkpoint (the bundled model by default): masks, overlays, and
optionally probabilities.

    python -m experiments.predict photos/ more/*.tif one.png -o out
    unetpp-predict 'stage1_train/*/images/*.png' -o out --probabilities

INPUT: image files (any format Pillow reads: PNG, JPEG, TIFF, ...; 8 or 16 bit; grey, RGB,
RGBA; any size), folders (their image files, not recursive) or quoted globs (** recurses).
Each image is read as cv2.imread does (BGR; 16 bit -> high byte; grey replicated; alpha
dropped), resized to the checkpoint's input size with training's OpenCV-exact INTER_LINEAR,
predicted, and the probabilities resized back to the image's size (bilinear) before the 0.5
threshold (one class) or the argmax (several). --native predicts at the image's own size
instead (padded, numpy 'reflect', to a multiple of 2**depth, then cropped).

Writes, under OUT (default ./predictions):
  masks/<name>.png          0/255 (one class) or the class index (several classes), image size
  overlays/<name>.png       the image with the mask outlined (small images enlarged)
  probabilities/<name>.npy  with --probabilities: float32, (H, W) foreground or (H, W, C)
  index.tsv                 input file -> name, size
<name> is the file's stem; stems that occur more than once among the inputs get their parent
folders prefixed ("a__x", "b__x"), then the extension ("x_png", "x_jpg") until unique.

Every input is read and checked before anything is written; each file is written atomically.
Exit codes: 0 done; 2 bad arguments or input (one line on stderr names the file and the
problem): a missing or unreadable/truncated image, a folder without images, a glob matching
nothing, an image with a side under 2**depth pixels (16 for the bundled model).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments.cli import positive_int as _positive

_GLOB_CHARS = set("*?[")
OUTPUT_DIRS = ("masks", "overlays", "probabilities")


class InputError(ValueError):
    """Bad input: the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Inputs


def _folder_images(folder: Path) -> list[Path]:
    from unetpp_jax.data.images import IMAGE_EXTENSIONS, is_image_name

    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and is_image_name(p))
    if not files:
        raise InputError(f"{folder}: the folder holds no image files "
                         f"({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
    return files


def resolve_inputs(inputs: list[str], out_dir: Path | None = None) -> list[Path]:
    """Files, folders and globs -> image files (absolute, in order, each once). Files under
    ``out_dir``'s output folders are left out (a rerun's glob must not read its own outputs)."""
    from unetpp_jax.data.images import is_image_name

    found: list[Path] = []
    for text in inputs:
        p = Path(text).expanduser()
        if p.exists():
            found.extend(_folder_images(p) if p.is_dir() else [p])
            continue
        if _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            files = []
            for m in map(Path, matches):
                if m.is_dir():
                    files.extend(q for q in sorted(m.iterdir()) if q.is_file() and is_image_name(q))
                elif m.is_file() and (is_image_name(m) or len(matches) == 1):
                    files.append(m)
            if not files:
                raise InputError(f"{text}: the glob matches no image file")
            found.extend(files)
            continue
        raise InputError(f"{text}: no such file or folder")
    skip = [(out_dir / d).absolute() for d in OUTPUT_DIRS] if out_dir is not None else []
    out, seen = [], set()
    for f in found:
        a = f.absolute()
        if any(s in a.parents for s in skip):
            continue
        key = os.path.realpath(a)
        if key not in seen:
            seen.add(key)
            out.append(a)
    if not out:
        raise InputError(f"{' '.join(inputs)}: no input images (only earlier outputs matched)")
    return out


def output_names(paths: list[Path]) -> list[str]:
    """A unique output name per input: its stem; colliding stems get parent folders prefixed
    (``a__x``), then the extension (``x_png``), then a counter (``x-2``)."""
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_stem.setdefault(p.stem, []).append(i)
    names = [p.stem for p in paths]
    for stem, idx in by_stem.items():
        if len(idx) == 1:
            continue
        parents = [paths[i].parent.parts for i in idx]

        def prefixed(depth):
            return ["__".join(list(pp[len(pp) - min(depth, len(pp)):]) + [stem])
                    for pp in parents]

        for depth in range(1, max(len(pp) for pp in parents) + 1):
            cand = prefixed(depth)
            if len(set(cand)) == len(cand):
                break
        else:  # same folder, different extensions: the nearest folder and the extension
            cand = prefixed(1)
            dup = {c for c in cand if cand.count(c) > 1}
            cand = [c + "_" + paths[i].suffix.lstrip(".").lower() if c in dup else c
                    for c, i in zip(cand, idx)]
        for c, i in zip(cand, idx):
            names[i] = c.lstrip("_") or stem
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # a built name may equal another file's plain stem
        if n in seen:
            k = 2
            while f"{n}-{k}" in seen or f"{n}-{k}" in names:
                k += 1
            names[i] = f"{n}-{k}"
        seen[names[i]] = i
    return names


# ---------------------------------------------------------------------------------------------
# Overlays

_COLOURS = [(255, 220, 0), (255, 0, 255), (0, 255, 255), (255, 96, 0), (0, 160, 255),
            (160, 255, 0), (255, 0, 96)]


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the inner outline)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1]
    return inner & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])


def _thicken(edge: np.ndarray, r: int) -> np.ndarray:
    out = edge.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy or dx:
                out |= np.roll(np.roll(edge, dy, 0), dx, 1)
    return out


def overlay(image_bgr: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """RGB uint8: the image with each class (1..) tinted lightly and outlined in its colour;
    enlarged by an integer factor (nearest) so that the long side is at least 384 pixels."""
    h, w = labels.shape
    f = max(1, -(-384 // max(h, w)))
    rgb = np.ascontiguousarray(image_bgr[..., ::-1])
    if f > 1:
        rgb = rgb.repeat(f, 0).repeat(f, 1)
        labels = labels.repeat(f, 0).repeat(f, 1)
    out = rgb.astype(np.float32)
    r = max(0, max(labels.shape) // 700)
    for c in range(1, max(2, num_classes)):
        m = labels == c
        if not m.any():
            continue
        colour = np.array(_COLOURS[(c - 1) % len(_COLOURS)], np.float32)
        out[m] = 0.75 * out[m] + 0.25 * colour
        e = _edges(m)
        out[_thicken(e, r) if r else e] = colour
    return out.round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Main




def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: {parent} is not writable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    ap.add_argument("-o", "--out", default="predictions",
                    help="output folder (default ./predictions)")
    ap.add_argument("--checkpoint", help="checkpoint directory or training workdir "
                    "(default: the bundled weights)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"),
                    help="inference arithmetic (default fp32); int8 is calibrated (kl) on up to "
                         "50 of the input images at the model's size")
    ap.add_argument("--head", default="last",
                    help="deep-supervision head 1..D or 'last' (default, as UNET-ZOO scores)")
    ap.add_argument("--native", action="store_true",
                    help="predict at each image's own resolution (padded to a multiple of "
                         "2**depth) instead of the checkpoint's input size")
    ap.add_argument("--probabilities", action="store_true",
                    help="also write probabilities/<name>.npy (float32, image size)")
    ap.add_argument("--batch-size", type=_positive, default=16,
                    help="images per model call (default 16)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from unetpp_jax.data.preprocess import PreprocessError

    try:
        return _run(args)
    except (InputError, PreprocessError) as e:  # PreprocessError: an image changed meanwhile
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from unetpp_jax.data.images import ImageReadError, read_image_bgr_any

    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    _check_out(out)
    paths = resolve_inputs(args.inputs, out)
    names = output_names(paths)

    from unetpp_jax.predict import Predictor
    from unetpp_jax.pretrained import load_checkpoint

    try:
        loaded = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--checkpoint {args.checkpoint}: {e}") from None
    n_heads = loaded.model.num_heads
    if args.head == "last":
        head = n_heads
    elif args.head.isdigit() and 1 <= int(args.head) <= n_heads:
        head = int(args.head)
    else:
        raise InputError(f"--head {args.head}: the checkpoint has heads 1..{n_heads} (or 'last')")
    t_model = time.perf_counter() - t_start

    # Pass 1: read and check every image before anything is written.
    from tqdm.auto import tqdm

    progress = not args.no_progress
    from unetpp_jax.data.preprocess import resize_linear_uint8
    from unetpp_jax.predict import DEFAULT_SIZE, size_problem

    size = loaded.input_spec.size or DEFAULT_SIZE
    small, shapes = [], []
    for p in tqdm(paths, desc="reading", unit="img", disable=not progress, leave=False):
        try:
            image = read_image_bgr_any(p)
        except ImageReadError as e:
            raise InputError(str(e)) from None
        problem = size_problem(*image.shape[:2], 2 ** loaded.model.depth)
        if problem:
            raise InputError(f"{p}: {problem}")
        shapes.append(image.shape[:2])
        if not args.native or (args.precision == "int8" and len(small) < 50):
            small.append(resize_linear_uint8(image, size))  # what Predictor.preprocess does
    small = np.stack(small) if small else None

    calibration = None
    if args.precision == "int8":
        from unetpp_jax import quant

        calibration = quant.calibrate(loaded.model, loaded.variables,
                                      loaded.input_spec.normalize(small[:50]), method="kl")
    predictor = Predictor(loaded.model, loaded.variables, input_spec=loaded.input_spec,
                          size=size, head=head, precision=args.precision,
                          calibration=calibration, batch_size=args.batch_size)
    t_read = time.perf_counter() - t_start - t_model

    # Pass 2: predict and write.
    try:
        return _predict_and_write(args, predictor, paths, names, shapes, small, out,
                                  t_model, t_read)
    except OSError as e:
        raise InputError(f"writing under {out}: {e.strerror or e} "
                         f"({getattr(e, 'filename', '') or ''}); files already written are "
                         "whole, rerun to redo the rest") from None


def _predict_and_write(args, predictor, paths, names, shapes, small, out, t_model, t_read):
    from tqdm.auto import tqdm

    from unetpp_jax.data.images import read_image_bgr_any
    from unetpp_jax.data.preprocess import encode_png
    from unetpp_jax.files import write_bytes_atomic, write_text_atomic

    progress = not args.no_progress
    n_classes = predictor.num_classes
    t0 = time.perf_counter()
    bar = tqdm(total=len(paths), desc=f"predict {predictor.precision}", unit="img",
               disable=not progress)
    rows = ["input\tname\twidth\theight"]
    bs = args.batch_size
    for start in range(0, len(paths), 1 if args.native else bs):
        idx = [start] if args.native else list(range(start, min(start + bs, len(paths))))
        if args.native:
            image = read_image_bgr_any(paths[start])
            probs = [predictor.restore(predictor.native(image[None])[0], image.shape[:2])]
            images = [image]
        else:
            raw = predictor.run(small[idx], batch=min(bs, len(paths)))
            images = [read_image_bgr_any(paths[i]) for i in idx]
            probs = [predictor.restore(r, shapes[i]) for r, i in zip(raw, idx)]
        for i, image, prob in zip(idx, images, probs):
            labels = predictor.to_mask(prob)
            mask = labels * np.uint8(255) if n_classes == 1 else labels
            write_bytes_atomic(out / "masks" / f"{names[i]}.png", encode_png(mask))
            write_bytes_atomic(out / "overlays" / f"{names[i]}.png",
                               encode_png(overlay(image, labels, n_classes)))
            if args.probabilities:
                import io

                buf = io.BytesIO()
                np.save(buf, np.asarray(prob, np.float32))
                write_bytes_atomic(out / "probabilities" / f"{names[i]}.npy", buf.getvalue())
            rows.append(f"{paths[i]}\t{names[i]}\t{shapes[i][1]}\t{shapes[i][0]}")
            bar.update(1)
    bar.close()
    write_text_atomic(out / "index.tsv", "\n".join(rows) + "\n")
    seconds = time.perf_counter() - t0
    n = len(paths)
    print(f"{n} images in {seconds:.1f} s ({n / seconds:.2f} images/s, {predictor.precision}, "
          f"{'native size' if args.native else 'at %dx%d' % predictor.size}; model load "
          f"{t_model:.1f} s, reading {t_read:.1f} s) -> {out}/masks, {out}/overlays"
          + (f", {out}/probabilities" if args.probabilities else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
