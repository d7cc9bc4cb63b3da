"""Convert a PyTorch UNet++ checkpoint (UNET-ZOO, pytorch-nested-unet or segmentation_models_pytorch)
into a unetpp-jax checkpoint.

    python weights_port/convert.py unet++_8_dsb2018Cell_21.pth [-o OUT] [--force]
    python weights_port/convert.py models/dsb2018_96_NestedUNet_woDS/model.pth   # reads config.yml
    python weights_port/convert.py smp_unetpp.pth          # smp UnetPlusPlus state_dict
    python weights_port/convert.py smp_folder/             # smp save_pretrained: config.json + model.safetensors

writes ``unet++_8_dsb2018Cell_21_flax/`` next to the input (see :mod:`unetpp_jax.checkpoint`);
load it with ``model, variables = unetpp_jax.model.load_pretrained(OUT)``.

Sources: UNET-ZOO's ``NestedUNet`` (keys ``conv0_0.conv.0.weight``) and pytorch-nested-unet's
``NestedUNet`` / ``UNet`` (keys ``conv0_0.conv1.weight``); bare state_dicts or training
checkpoints that wrap one. When pytorch-nested-unet's ``config.yml`` lies beside the file (its
``train.py`` writes ``models/<name>/config.yml`` next to ``model.pth``), the model settings come
from it (``arch``, ``deep_supervision``, ``num_classes``, ``input_channels``, ``input_h``/``input_w``).
The input normalisation each source trained with is recorded under ``"input"`` in
``metadata.json`` (see :func:`input_spec`).

segmentation_models_pytorch's ``UnetPlusPlus`` (ResNet encoders; keys ``encoder.layer1.0.conv1.weight``,
``decoder.blocks.x_0_0.conv1.0.weight``, ``segmentation_head.0.weight``) becomes
``unetpp_jax.smp_unetplusplus.SMPUnetPlusPlus``: from a state_dict ``.pth`` (settings read from the
tensors, or from ``--config config.json``), a ``save_pretrained`` folder or a ``.safetensors`` file
(settings from the ``config.json`` in the folder or beside the file; see
:mod:`weights_port.smp_files`).

PyTorch is not needed and never imported: :mod:`weights_port.torch_format` reads both file
formats with a restricted unpickler, :mod:`weights_port.keymap` maps and checks the keys.
Exit status: 0 converted; 2 the file could not be read, was refused, does not match the model,
holds NaN/Inf weights (unless ``--allow-nonfinite``), or the output could not be written. Errors
are one line on stderr naming the file (a key mismatch adds a few lines listing the first
problems), and nothing is written.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # before the heavy imports, so the summary can report both

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import errno  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __name__ == "__main__" and not __package__:  # run as a script path: import the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from unetpp_jax import __version__, checkpoint  # noqa: E402
from unetpp_jax.counting import count_params  # noqa: E402
from unetpp_jax.pretrained import model_description  # noqa: E402
from unetpp_jax.data.normalization import IMAGENET_RGB_INPUT  # noqa: E402
from weights_port import keymap, smp_files, torch_format  # noqa: E402
from weights_port.torch_format import CheckpointFormatError, printable, safe_line  # noqa: E402

FORMAT_NAMES = {"zip": "zip, PyTorch >= 1.6", "legacy": "legacy pickle, PyTorch < 1.6",
                "safetensors": "safetensors"}
CONFIG_NAME = "config.yml"  # pytorch-nested-unet's train.py: models/<name>/config.yml
MAX_CONFIG_BYTES = 1 << 20
NESTED_UNET_ARCHS = {"NestedUNet": "nested", "UNet": "unet"}

# albumentations Normalize() defaults: ImageNet statistics, max_pixel_value 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """``config.yml`` is unreadable or has a field of the wrong type (one line, naming both)."""


# smp config.json fields recorded in metadata.json (the constructor's arguments)
SMP_CONFIG_RECORDED = ("_model_class", "encoder_name", "encoder_depth", "encoder_weights",
                       "decoder_channels", "decoder_attention_type", "decoder_use_norm",
                       "decoder_use_batchnorm", "decoder_interpolation", "in_channels", "classes",
                       "activation", "aux_params")


def default_output(src: str | Path) -> Path:
    """``dir/name.pth`` -> ``dir/name_flax`` (next to the input, named after it)."""
    src = Path(src)
    return src.with_name(src.stem + "_flax") if src.suffix else src.with_name(src.name + "_flax")


def input_spec(style: str, size: tuple[int, int] | None = None, in_channels: int = 3) -> dict:
    """The input normalisation the source trained with, as ``metadata.json``'s ``"input"``:
    ``x = (pixel / 255 - mean[c]) / std[c]`` per channel, channels in ``channel_order``.

    * UNET-ZOO: ``cv2.imread`` (BGR), ``/ 255``, then ``(x - 0.5) / 0.5``.
    * pytorch-nested-unet (``dataset.py``): ``cv2.imread`` (BGR), albumentations ``Normalize()``
      -- ``(pixel - 255 m) / (255 s)`` with ImageNet m, s in array order, so applied to B, G, R
      as if they were R, G, B -- then ``/ 255`` once more. ``((p/255 - m)/s)/255 = (p/255 - m)/(255 s)``:
      the second division is folded into ``std`` exactly (values end up in about [-0.008, 0.010]).
    * segmentation_models_pytorch (ResNet encoders): RGB, ``x/255``, ImageNet mean/std
      (``smp.encoders.get_preprocessing_params``: the statistics the encoder was pretrained
      with); smp fixes none for inputs other than 3 channels (``x/255`` recorded, with a note).
    """
    if style == keymap.SMP_STYLE and in_channels == 3:
        spec = {**IMAGENET_RGB_INPUT.to_json(),
                "note": "segmentation_models_pytorch ResNet encoders: RGB, x/255, ImageNet "
                        "mean/std (smp.encoders.get_preprocessing_params)"}
    elif style == keymap.SMP_STYLE:
        spec = {"channel_order": "RGB", "mean": [0.0] * in_channels, "std": [1.0] * in_channels,
                "note": f"segmentation_models_pytorch with in_channels={in_channels}: smp fixes no "
                        "normalisation for it; x/255 recorded, set the one the model was trained with"}
    elif style == "pytorch-nested-unet":
        spec = {"channel_order": "BGR", "mean": list(IMAGENET_MEAN),
                "std": [round(255 * s, 6) for s in IMAGENET_STD],
                "note": "albumentations Normalize() (ImageNet mean/std in B,G,R array order) then "
                        "/255 again (pytorch-nested-unet dataset.py): std = 255 x ImageNet std"}
    else:
        spec = {"channel_order": "BGR", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                "note": "UNET-ZOO: cv2.imread (BGR), x/255, then (x - 0.5)/0.5"}
    if size is not None:
        spec["size"] = [int(size[0]), int(size[1])]
    return spec


def _parse_flat_yaml(text: str) -> dict:
    """A ``key: value`` per line (what ``yaml.dump`` writes for a flat dict of scalars); used
    only when PyYAML is not installed."""
    out: dict = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or line[:1].isspace():
            raise ValueError(f"unsupported line {printable(line, 60)!r}")
        value = value.strip()
        low = value.lower()
        if low in ("true", "false"):
            parsed: object = low == "true"
        elif low in ("null", "~", ""):
            parsed = None
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value.strip("'\"")
        out[key.strip()] = parsed
    return out


def read_config(path: Path) -> dict:
    """pytorch-nested-unet's ``config.yml`` as model settings for :func:`keymap.convert_state_dict`
    (plus ``arch`` and ``size``). Raises :class:`ConfigError` naming the file and the field."""
    where = printable(str(path))
    try:
        data = torch_format._read_regular_file(path, where)
    except CheckpointFormatError as exc:
        raise ConfigError(str(exc)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: is larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config.yml")
    try:
        text = data.decode("utf-8")
        try:
            import yaml
        except ImportError:
            raw = _parse_flat_yaml(text)
        else:
            raw = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 -- any parse failure of an untrusted file
        raise ConfigError(f"{where}: cannot be parsed as YAML "
                          f"({printable(str(exc).splitlines()[0] if str(exc) else '', 120)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")

    def field(name, kind, default):
        value = raw.get(name, default)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        if not ok:
            raise ConfigError(f"{where}: field {name!r} must be "
                              f"{'true/false' if kind is bool else 'a positive integer'}, "
                              f"got {printable(repr(value), 60)}")
        return value

    arch = raw.get("arch", "NestedUNet")
    if arch not in NESTED_UNET_ARCHS:
        raise ConfigError(f"{where}: field 'arch' is {printable(repr(arch), 60)}; only "
                          f"{' and '.join(NESTED_UNET_ARCHS)} can be converted")
    settings = {"skips": NESTED_UNET_ARCHS[arch], "arch": arch,
                "deep_supervision": field("deep_supervision", bool, False) and arch == "NestedUNet",
                "num_classes": field("num_classes", int, 1),
                "in_channels": field("input_channels", int, 3)}
    if "input_h" in raw or "input_w" in raw:
        settings["size"] = (field("input_h", int, 96), field("input_w", int, 96))
    return settings


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
    config: Path | None = None
    input: dict | None = None


def convert(src: str | Path, out: str | Path | None = None, *, force: bool = False,
            allow_nonfinite: bool = False, config: str | Path | None = None,
            use_config: bool = True) -> Result:
    """Read ``src``, map it onto ``UNetPlusPlus`` (or, for segmentation_models_pytorch's
    UnetPlusPlus, ``SMPUnetPlusPlus``) variables and save them (atomically) to ``out``.

    ``src``: a ``.pth`` (zip or legacy), an smp ``save_pretrained`` folder or a ``.safetensors``
    file. ``config`` names a pytorch-nested-unet ``config.yml`` or smp's ``config.json``; by
    default the one lying beside ``src`` is used for pytorch-nested-unet-style keys, and the one
    in the folder (or beside the ``.safetensors``) for smp (``use_config=False`` ignores it).

    Raises ``torch_format.CheckpointFormatError`` (unreadable or refused file),
    ``keymap.KeyMapError`` (checkpoint and model disagree), ``keymap.NonFiniteError`` (NaN/Inf
    weights without ``allow_nonfinite``), :class:`ConfigError` / ``smp_files.ConfigError``, or
    ``checkpoint.CheckpointExistsError`` (``out`` exists and ``force`` is false, or holds other
    files); in each case nothing is written.
    """
    t0 = time.perf_counter()
    src = Path(src)
    out = default_output(src) if out is None else Path(out)
    checkpoint.ensure_writable(out, force)  # fail before the work, not after
    beside_json = None  # smp's config.json, for a save_pretrained folder or .safetensors file
    if src.is_dir():
        if not smp_files.is_smp_folder(src):
            raise CheckpointFormatError(
                f"{printable(str(src))}: is a directory, not a checkpoint file (nor a "
                f"segmentation_models_pytorch save_pretrained folder with {smp_files.WEIGHTS_NAME})")
        sd_np, sha, size = smp_files.load_safetensors(src / smp_files.WEIGHTS_NAME)
        loaded = torch_format.TorchCheckpoint(sd_np, "safetensors", sha, size)
        beside_json = src / smp_files.CONFIG_NAME
    elif src.suffix == ".safetensors":
        sd_np, sha, size = smp_files.load_safetensors(src)
        loaded = torch_format.TorchCheckpoint(sd_np, "safetensors", sha, size)
        beside_json = src.parent / smp_files.CONFIG_NAME
    else:
        loaded = torch_format.load(src)
    t1 = time.perf_counter()
    sd, _ = keymap.extract_state_dict(loaded.obj)
    style = keymap.detect_style(sd) or "unet-zoo"
    settings, raw_config = None, None
    if style == keymap.SMP_STYLE:
        config_path = Path(config) if config is not None else beside_json
        if config is not None or (use_config and config_path is not None
                                  and config_path.is_file()):
            settings, raw_config = smp_files.read_config(config_path)
        else:
            config_path = None
    else:
        config_path = Path(config) if config is not None else src.parent / CONFIG_NAME
        if config is not None or (use_config and style == "pytorch-nested-unet"
                                  and config_path.is_file()):
            settings = read_config(config_path)
        else:
            config_path = None
    model_settings = {k: v for k, v in (settings or {}).items() if k not in ("arch", "size")}
    try:
        conv = keymap.convert_state_dict(loaded.obj, settings=model_settings,
                                         allow_nonfinite=allow_nonfinite)
    except keymap.KeyMapError as exc:
        if config_path is None:
            raise
        raise keymap.KeyMapError(exc.header, exc.problems, exc.hints + [
            f"model settings taken from {printable(str(config_path))}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(model_settings.items()))]) from None
    except CheckpointFormatError as exc:  # a tensor's bytes, when materialised
        raise CheckpointFormatError(f"{printable(str(src))}: {exc}") from None
    t2 = time.perf_counter()
    model = conv.model
    in_channels = int(conv.settings["in_channels"])
    if conv.style == keymap.SMP_STYLE:
        arch = f"UnetPlusPlus(encoder_name={model.encoder!r})"
        conv.notes.extend(smp_files.config_notes(raw_config or {}))
    else:
        arch = (settings or {}).get("arch") or ("UNet" if conv.settings.get("skips") == "unet"
                                                else "NestedUNet")
    spec = input_spec(conv.style, (settings or {}).get("size"), in_channels)
    params, stats = conv.variables["params"], conv.variables["batch_stats"]
    source = {"file": src.name, "sha256": loaded.sha256, "size_bytes": loaded.size_bytes,
              "format": loaded.format, "layout": conv.style,
              "origin": keymap.ORIGINS[conv.style].format(arch=arch)}
    if raw_config is not None:
        source["config"] = {"file": config_path.name, **{
            k: v for k, v in raw_config.items() if k in SMP_CONFIG_RECORDED}}
    elif config_path is not None:
        source["config"] = {"file": config_path.name, **{
            k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    metadata = {
        "model": model_description(model, in_channels),
        "input": spec,
        "source": source,
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
                  seconds={"read": t1 - t0, "map": t2 - t1, "write": t3 - t2, "total": t3 - t0},
                  config=config_path, input=spec)


def summary(r: Result, since_start: float | None = None) -> str:
    """The one-screen report printed by the command line (file-derived names escaped)."""
    c = r.conversion
    smp = c.style == keymap.SMP_STYLE
    if smp:
        heads = "segmentation_head (single head, logits)"
    elif c.model.deep_supervision:
        heads = f"final1..final{len(c.model.widths) - 1} (deep supervision)"
    else:
        heads = "final (single head)"
    skips = c.settings.get("skips", "nested")
    if smp:
        m = c.model
        layout = (f"{c.style} (encoder {m.encoder}, depth {m.encoder_depth}, decoder_channels "
                  f"{tuple(m.decoder_channels)}, attention {m.decoder_attention_type}, decoder "
                  f"{'BatchNorm' if m.decoder_use_batchnorm else 'no norm'})")
        dropped = f"{len(c.dropped)} dropped (num_batches_tracked, unused parts: see notes)"
    else:
        layout = f"{c.style} ({'plain U-Net skips' if skips == 'unet' else 'nested skips'})"
        dropped = f"{len(c.dropped)} num_batches_tracked dropped"
    casts = (", ".join(f"{dt} -> float32 for {n} tensors" for dt, n in sorted(c.dtype_casts.items()))
             or "all float32, no casts")
    s = r.seconds
    time_line = (f"{s['total']:.2f} s (read {s['read']:.2f}, map {s['map']:.2f}, "
                 f"write {s['write']:.2f})")
    if since_start is not None:
        time_line += f"; {since_start:.2f} s with imports"
    spec = r.input or {}
    size = f", size {spec['size'][0]}x{spec['size'][1]}" if "size" in spec else ""
    lines = [
        f"converted  {printable(str(r.source))}",
        f"  format     {FORMAT_NAMES[r.source_format]}; {r.size_bytes / 1e6:.1f} MB; "
        f"sha256 {r.sha256[:16]}...",
        f"  layout     {layout}"
        + (f"; settings from {printable(str(r.config))}" if r.config else ""),
        f"  keys       {c.mapped} mapped onto params/batch_stats, {dropped}",
        *[f"  note       {safe_line(n)}" for n in c.notes],
        f"  heads      {heads}; {c.model.num_classes} class(es)",
        f"  params     {r.param_count:,} (+ {r.stat_count:,} BatchNorm running statistics)",
        f"  dtypes     {casts}",
        f"  input      {spec.get('channel_order')}, (pixel/255 - mean)/std, mean "
        f"{spec.get('mean')}, std {spec.get('std')}{size}",
        f"  written    {printable(str(r.output))}",
        f"  load with  unetpp_jax.model.load_pretrained({printable(repr(str(r.output)))})",
        f"  time       {time_line}",
    ]
    return "\n".join(lines)


def _write_error(out: Path | None, exc: BaseException) -> str:
    code = errno.errorcode.get(getattr(exc, "errno", None) or 0, "")
    nospace = code == "ENOSPC" or "No space left" in str(exc)
    what = "no space left on device (ENOSPC); free some space or choose another -o" if nospace \
        else f"{getattr(exc, 'strerror', None) or exc}"
    return f"cannot write {out}: {what}; nothing was written"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert.py", description="Convert a UNET-ZOO, pytorch-nested-unet or "
        "segmentation_models_pytorch UnetPlusPlus PyTorch checkpoint (zip or legacy .pth, or an "
        "smp save_pretrained folder / .safetensors) into a unetpp-jax checkpoint directory, "
        "without PyTorch.")
    parser.add_argument("checkpoint", help="the .pth file (a state_dict, possibly wrapped), or an "
                        "smp save_pretrained folder (config.json + model.safetensors)")
    parser.add_argument("-o", "--output", help="output directory (default: next to the input, "
                        "named after it with _flax)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output checkpoint (never one holding other files)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert even if some weights are NaN or infinite")
    parser.add_argument("--config", help="pytorch-nested-unet config.yml (default: the one beside "
                        "the checkpoint, if any), or smp's config.json (default: the one in the "
                        "save_pretrained folder / beside the .safetensors)")
    parser.add_argument("--no-config", action="store_true",
                        help="ignore a config.yml beside the checkpoint; infer settings from the keys")
    args = parser.parse_args(argv)
    src = printable(args.checkpoint)
    out = Path(args.output) if args.output else default_output(args.checkpoint)

    def fail(message: str) -> int:
        print(f"error: {safe_line(message)}", file=sys.stderr)  # one line
        return 2

    try:
        result = convert(args.checkpoint, args.output, force=args.force,
                         allow_nonfinite=args.allow_nonfinite, config=args.config,
                         use_config=not args.no_config)
    except keymap.KeyMapError as exc:
        first, *rest = str(exc).split("\n")
        lines = [f"error: {src}: {safe_line(first)}; nothing was written"]
        print("\n".join(lines + [safe_line(r) for r in rest]), file=sys.stderr)
        return 2
    except keymap.NonFiniteError as exc:
        return fail(f"{src}: {exc}; nothing was written")
    except (CheckpointFormatError, ConfigError, smp_files.ConfigError,
            checkpoint.CheckpointExistsError) as exc:
        return fail(str(exc))
    except OSError as exc:  # an unwritable output directory, a full disk
        return fail(_write_error(out, exc))
    except Exception as exc:  # noqa: BLE001 -- the CLI contract: one line, exit 2, no traceback
        if "No space left" in str(exc):
            return fail(_write_error(out, exc))
        return fail(f"{src}: conversion failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written")
    print(summary(result, time.perf_counter() - _T_START))
    return 0


if __name__ == "__main__":
    sys.exit(main())
