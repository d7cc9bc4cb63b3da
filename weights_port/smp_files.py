"""segmentation_models_pytorch's ``save_pretrained`` folders, read without PyTorch.

``model.save_pretrained(folder)`` (smp >= 0.3, through huggingface_hub's ``ModelHubMixin``)
writes ``config.json`` (the constructor's arguments: ``encoder_name``, ``encoder_depth``,
``decoder_channels``, ``decoder_attention_type``, ``decoder_use_norm`` -- or, before smp 0.5,
``decoder_use_batchnorm`` --, ``classes``, ``in_channels``, ...), ``model.safetensors`` (the
state_dict) and a ``README.md``. The safetensors file is read with the ``safetensors`` package's
torch-free deserializer (a JSON header and raw little-endian arrays: no code can run), bfloat16
through ``ml_dtypes``. Failures are :class:`~weights_port.torch_format.CheckpointFormatError`
(or :class:`ConfigError` for the config), one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from weights_port.torch_format import CheckpointFormatError, _read_regular_file, printable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
SMP_INTERPOLATION = "nearest"  # the only decoder_interpolation SMPUnetPlusPlus implements

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class ConfigError(ValueError):
    """``config.json`` is unreadable, not smp's, or asks for something not supported."""


def is_smp_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder: a directory holding ``model.safetensors``."""
    return path.is_dir() and (path / WEIGHTS_NAME).is_file()


def load_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], str, int]:
    """``(state_dict of numpy arrays, sha256, size in bytes)`` of a ``.safetensors`` file."""
    from safetensors import deserialize

    path = Path(path)
    source = printable(str(path))
    data = _read_regular_file(path, source)
    if not data:
        raise CheckpointFormatError(f"{source}: is empty (0 bytes)")
    try:
        entries = deserialize(data)
        sd = {}
        for name, info in entries:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {printable(name, 60)} has unsupported dtype "
                                 f"{printable(info['dtype'], 20)}")
            sd[name] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
    except CheckpointFormatError:
        raise
    except Exception as exc:  # untrusted input: any parse failure is a format error
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointFormatError(
            f"{source}: is not a readable safetensors file ({printable(line, 120)})") from None
    return sd, hashlib.sha256(data).hexdigest(), len(data)


def read_config(path: str | Path) -> tuple[dict, dict]:
    """smp's ``config.json`` as ``SMPUnetPlusPlus`` settings (for
    ``keymap.convert_smp_state_dict``) and the raw config (recorded in the metadata).

    Refuses (:class:`ConfigError`) another smp architecture, a decoder normalisation other than
    BatchNorm or none, and an interpolation other than nearest."""
    path = Path(path)
    where = printable(str(path))
    try:
        data = _read_regular_file(path, where)
    except CheckpointFormatError as exc:
        raise ConfigError(str(exc)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: is larger than {MAX_CONFIG_BYTES >> 20} MiB; not smp's "
                          "config.json")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where}: is not JSON ({printable(str(exc), 80)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object of settings, got {type(raw).__name__}")

    def bad(field, why):
        return ConfigError(f"{where}: field {field!r} {why}, got "
                           f"{printable(repr(raw.get(field)), 60)}")

    cls = raw.get("_model_class", "UnetPlusPlus")
    if cls != "UnetPlusPlus":
        raise ConfigError(f"{where}: is the config of smp {printable(repr(cls), 40)}; only "
                          "UnetPlusPlus converts")
    settings: dict[str, Any] = {}
    if "encoder_name" in raw:
        settings["encoder"] = raw["encoder_name"]
        if not isinstance(settings["encoder"], str):
            raise bad("encoder_name", "must be a string")
    for field, name in (("encoder_depth", "encoder_depth"), ("classes", "num_classes"),
                        ("in_channels", "in_channels")):
        if field in raw:
            v = raw[field]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(field, "must be a positive integer")
            settings[name] = v
    if "decoder_channels" in raw:
        v = raw["decoder_channels"]
        if (not isinstance(v, list) or not v
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in v)):
            raise bad("decoder_channels", "must be a list of positive integers")
        settings["decoder_channels"] = tuple(v)
    if "decoder_attention_type" in raw:
        v = raw["decoder_attention_type"]
        if v not in (None, "scse"):
            raise bad("decoder_attention_type", "must be null or 'scse' (what converts)")
        settings["decoder_attention_type"] = v
    norm_field = next((f for f in ("decoder_use_norm", "decoder_use_batchnorm") if f in raw), None)
    if norm_field is not None:
        v = raw[norm_field]
        kind = v.get("type") if isinstance(v, dict) else v
        if isinstance(v, dict) and set(v) - {"type", "momentum"}:
            raise bad(norm_field, "may only set the type (other BatchNorm options, e.g. eps, "
                      "are not converted)")
        if kind in (True, "batchnorm"):
            settings["decoder_use_batchnorm"] = True
        elif kind in (False, "identity"):
            settings["decoder_use_batchnorm"] = False
        else:
            raise bad(norm_field, "must be batchnorm (true) or identity (false); other "
                      "normalisations (inplace, layernorm, instancenorm) do not convert")
    interpolation = raw.get("decoder_interpolation", SMP_INTERPOLATION)
    if interpolation != SMP_INTERPOLATION:
        raise bad("decoder_interpolation", f"must be {SMP_INTERPOLATION!r} (what converts)")
    return settings, raw


def config_notes(raw: dict) -> list[str]:
    """What a config asks for that the converted model does not do itself."""
    notes = []
    act = raw.get("activation")
    if act is not None:
        notes.append(f"smp activation {printable(repr(act), 40)} is not part of the converted "
                     "model: it returns logits, and predict_fn applies sigmoid (1 class) or "
                     "softmax (several)")
    if raw.get("aux_params") is not None:
        notes.append("aux_params: the classification head is not converted (only the mask)")
    return notes
