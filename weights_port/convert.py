"""Convert a UNET-ZOO PyTorch checkpoint (``NestedUNet`` state_dict) into a unetpp-jax checkpoint.

    python weights_port/convert.py unet++_8_dsb2018Cell_21.pth [-o OUT] [--force]

writes ``unet++_8_dsb2018Cell_21_flax/`` next to the input (see :mod:`unetpp_jax.checkpoint`);
load it with ``model, variables = unetpp_jax.model.load_pretrained(OUT)``.

PyTorch is not needed and never imported: :mod:`weights_port.torch_format` reads both file
formats with a restricted unpickler, :mod:`weights_port.keymap` maps and checks the keys.
Exit status: 0 converted; 2 the file could not be read, was refused, or does not match the
model (every problem is listed, and nothing is written).
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # before the heavy imports, so the summary can report both

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __name__ == "__main__" and not __package__:  # run as a script path: import the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from unetpp_jax import __version__, checkpoint  # noqa: E402
from unetpp_jax.model import count_params, model_metadata  # noqa: E402
from weights_port import keymap, torch_format  # noqa: E402

FORMAT_NAMES = {"zip": "zip, PyTorch >= 1.6", "legacy": "legacy pickle, PyTorch < 1.6"}


def default_output(src: str | Path) -> Path:
    """``dir/name.pth`` -> ``dir/name_flax`` (next to the input, named after it)."""
    src = Path(src)
    return src.with_name(src.stem + "_flax") if src.suffix else src.with_name(src.name + "_flax")


@dataclasses.dataclass
class Result:
    source: Path
    output: Path
    source_format: str
    sha256: str
    size_bytes: int
    conversion: keymap.Conversion
    param_count: int
    stat_count: int
    seconds: dict[str, float]


def convert(src: str | Path, out: str | Path | None = None, *, force: bool = False) -> Result:
    """Read ``src``, map it onto ``UNetPlusPlus`` variables and save them (atomically) to ``out``.

    Raises ``torch_format.CheckpointFormatError`` (unreadable or refused file),
    ``keymap.KeyMapError`` (checkpoint and model disagree) or
    ``checkpoint.CheckpointExistsError`` (``out`` exists and ``force`` is false); in each case
    nothing is written.
    """
    t0 = time.perf_counter()
    src = Path(src)
    out = default_output(src) if out is None else Path(out)
    checkpoint.ensure_writable(out, force)  # fail before the work, not after
    loaded = torch_format.load(src)
    t1 = time.perf_counter()
    conv = keymap.convert_state_dict(loaded.obj)
    t2 = time.perf_counter()
    model = conv.model
    params, stats = conv.variables["params"], conv.variables["batch_stats"]
    metadata = {
        "model": model_metadata(model),
        "source": {"file": src.name, "sha256": loaded.sha256, "size_bytes": loaded.size_bytes,
                   "format": loaded.format, "origin": "UNET-ZOO NestedUNet state_dict"},
        "conversion": {
            "tool": "weights_port/convert.py", "unetpp_jax_version": __version__,
            "entries_mapped": conv.mapped, "entries_dropped": conv.dropped, "notes": conv.notes,
            "cast_to_float32": conv.dtype_casts,
            "conv_layout": "PyTorch OIHW -> Flax HWIO",
            "batchnorm": "weight->scale, bias->bias, running_mean->mean, running_var->var as-is "
                         "(PyTorch's running estimate of the unbiased variance, what its eval uses)",
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    written = checkpoint.save_variables(out, conv.variables, metadata, force=force)
    t3 = time.perf_counter()
    return Result(source=src, output=written, source_format=loaded.format, sha256=loaded.sha256,
                  size_bytes=loaded.size_bytes, conversion=conv, param_count=count_params(params),
                  stat_count=count_params(stats),
                  seconds={"read": t1 - t0, "map": t2 - t1, "write": t3 - t2, "total": t3 - t0})


def summary(r: Result, since_start: float | None = None) -> str:
    """The one-screen report printed by the command line."""
    c = r.conversion
    heads = ("final1..final4 (deep supervision; UNET-ZOO scores final4)"
             if c.model.deep_supervision else "final (single head)")
    casts = (", ".join(f"{dt} -> float32 for {n} tensors" for dt, n in sorted(c.dtype_casts.items()))
             or "all float32, no casts")
    s = r.seconds
    time_line = (f"{s['total']:.2f} s (read {s['read']:.2f}, map {s['map']:.2f}, "
                 f"write {s['write']:.2f})")
    if since_start is not None:
        time_line += f"; {since_start:.2f} s with imports"
    lines = [
        f"converted  {r.source}",
        f"  format     {FORMAT_NAMES[r.source_format]}; {r.size_bytes / 1e6:.1f} MB; "
        f"sha256 {r.sha256[:16]}...",
        f"  keys       {c.mapped} mapped onto params/batch_stats, "
        f"{len(c.dropped)} num_batches_tracked dropped",
        *[f"  note       {n}" for n in c.notes],
        f"  heads      {heads}",
        f"  params     {r.param_count:,} (+ {r.stat_count:,} BatchNorm running statistics)",
        f"  dtypes     {casts}",
        "  batchnorm  running_var loaded as-is: what PyTorch's eval divides by",
        f"  written    {r.output}",
        f"  load with  unetpp_jax.model.load_pretrained({str(r.output)!r})",
        f"  time       {time_line}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert.py", description="Convert a UNET-ZOO NestedUNet PyTorch checkpoint "
        "(zip or legacy format) into a unetpp-jax checkpoint directory, without PyTorch.")
    parser.add_argument("checkpoint", help="the .pth file (a state_dict, possibly wrapped)")
    parser.add_argument("-o", "--output", help="output directory (default: next to the input, "
                        "named after it with _flax)")
    parser.add_argument("--force", action="store_true", help="replace an existing output checkpoint")
    args = parser.parse_args(argv)
    try:
        result = convert(args.checkpoint, args.output, force=args.force)
    except keymap.KeyMapError as exc:
        print(f"error: {args.checkpoint}: {exc}\nnothing was written.", file=sys.stderr)
        return 2
    except (torch_format.CheckpointFormatError, checkpoint.CheckpointExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an unwritable output directory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result, time.perf_counter() - _T_START))
    return 0


if __name__ == "__main__":
    sys.exit(main())
