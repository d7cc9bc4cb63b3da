"""Loading models: the model description a checkpoint records, rebuilding a model from it, the
bundled weights, and the one loader that evaluation, training, export and the benchmark use.

A checkpoint's ``metadata.json`` holds ``'model'`` (a description: the architecture's name and
its settings) and ``'input'`` (``data.normalization.InputSpec``)::

    {"model": {"name": "UNetPlusPlus", "encoder": "vgg", "widths": [32, 64, 128, 256, 512],
               "deep_supervision": true, "num_classes": 1, "skips": "nested", "in_channels": 3},
     "input": {"channel_order": "BGR", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}

Adding an architecture: its Flax module and one line in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unetpp_jax.data.normalization import InputSpec

# name -> "module:class" (imported on use, so an architecture costs nothing until it is used)
ARCHITECTURES = {
    "UNetPlusPlus": "unetpp_jax.model:UNetPlusPlus",
    "SMPUnetPlusPlus": "unetpp_jax.smp_unetplusplus:SMPUnetPlusPlus",  # segmentation_models_pytorch
}
BUNDLED_NAME = "unetpp_dsb2018_96"
_NOT_SETTINGS = ("parent", "name", "numerics")


def architecture(name: str):
    """The Flax module class registered as ``name``."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _settings(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_SETTINGS and f.init}


def model_description(model, in_channels: int = 3) -> dict:
    """The JSON description of ``model`` from which :func:`build_model` rebuilds it."""
    cls = type(model)
    name = next((k for k, v in ARCHITECTURES.items() if v.endswith(":" + cls.__name__)), None)
    if name is None:
        raise ValueError(f"{cls.__name__} is not in pretrained.ARCHITECTURES")
    desc = {"name": name, "in_channels": int(in_channels)}
    for field in _settings(cls):
        v = getattr(model, field)
        desc[field] = list(v) if isinstance(v, (tuple, list)) else v
    return desc


def _coerce(value, default, field: str, where: str):
    """``value`` checked against the type of the field's default (JSON has lists, not tuples)."""
    bad = ValueError(f"{where}: model field {field!r} must be like {default!r}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, (tuple, list)):
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise bad
        return tuple(value)
    if default is None or isinstance(default, float):
        return value
    raise bad


def build_model(description: Mapping, numerics: Any = None, where: str = "model description"):
    """The Flax module a description names, with its settings (checked: a wrong type or an
    unknown field raises ``ValueError`` naming ``where`` and the field)."""
    if not isinstance(description, Mapping):
        raise ValueError(f"{where}: the model description must be an object")
    cls = architecture(description.get("name"))
    fields = _settings(cls)
    unknown = set(description) - set(fields) - {"name", "in_channels"}
    if unknown:
        raise ValueError(f"{where}: unknown model field(s) {sorted(unknown)} for "
                         f"{description['name']}; known: {sorted(fields)}")
    kwargs = {}
    for field, f in fields.items():
        if field in description:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs[field] = _coerce(description[field], default, field, where)
    if numerics is not None:
        kwargs["numerics"] = numerics
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def in_channels_of(description: Mapping, where: str = "model description") -> int:
    c = description.get("in_channels", 3)
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"{where}: model field 'in_channels' must be a positive int, got {c!r}")
    return c


def abstract_variables(model, in_channels: int = 3):
    """The model's variable tree as shapes (``jax.eval_shape``, nothing computed)."""
    from unetpp_jax.model import min_input_shape

    shape = min_input_shape(model, (1, 16, 16, in_channels))
    return jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                          jax.ShapeDtypeStruct(shape, jnp.float32))


class Pretrained(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    model: Any
    variables: dict
    metadata: dict
    input_spec: InputSpec
    name: str  # how to refer to it in reports: "bundled (...)", a path, "<workdir> (best epoch)"


def bundled_checkpoint_path() -> Path:
    """Directory of the bundled fp32 checkpoint (``unetpp_jax/assets/weights/<name>``)."""
    return Path(str(importlib.resources.files("unetpp_jax") / "assets" / "weights" / BUNDLED_NAME))


def _from_checkpoint_dir(path: Path, numerics) -> tuple[Any, dict, dict, InputSpec]:
    from unetpp_jax.checkpoint import check_tree, load_variables, read_metadata

    # The description is checked before any array is read.
    where = str(Path(path) / "metadata.json")
    desc = read_metadata(path).get("model")
    if not isinstance(desc, Mapping):
        raise ValueError(f"{where}: no 'model' entry (the model description)")
    model = build_model(desc, numerics, where)
    in_channels = in_channels_of(desc, where)
    variables, metadata = load_variables(path)
    spec = InputSpec.from_json(metadata.get("input"), where)
    check_tree(variables, abstract_variables(model, in_channels),
               f"{path}: variables do not fit {desc.get('name')}")
    return model, variables, metadata, spec


def load_checkpoint(path=None, numerics: Any = None) -> Pretrained:
    """The one loader: ``path`` None (the bundled weights), a checkpoint directory
    (``metadata.json`` + ``variables/``: converted, exported or bundled) or a training workdir
    (its best checkpoint). ``numerics`` optionally swaps the inference arithmetic.

    The variables are checked against the model's own tree before any compute, so a checkpoint
    that does not fit raises ``ValueError`` here; a missing path ``FileNotFoundError``.
    """
    from unetpp_jax.checkpoint import is_checkpoint

    if path is None:
        p = bundled_checkpoint_path()
        if not is_checkpoint(p):
            raise FileNotFoundError(
                f"no bundled checkpoint at {p}: pass a checkpoint (convert a PyTorch .pth with "
                "weights_port/convert.py, or train one with python -m experiments.train)")
        model, variables, meta, spec = _from_checkpoint_dir(p, numerics)
        return Pretrained(model, variables, meta, spec, f"bundled ({p.name})")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if is_checkpoint(p):
        model, variables, meta, spec = _from_checkpoint_dir(p.absolute(), numerics)
        return Pretrained(model, variables, meta, spec, str(path))
    if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        from unetpp_jax.train import load_best

        model, variables = load_best(p.absolute())
        if numerics is not None:
            model = model.clone(numerics=numerics)
        meta = {"model": model_description(model)}
        return Pretrained(model, variables, meta, InputSpec.from_json(None), f"{path} (best epoch)")
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        raise ValueError(f"{p} is a PyTorch checkpoint: convert it first with "
                         f"python weights_port/convert.py {p}")
    if p.is_dir() and (p / "model.safetensors").is_file():
        raise ValueError(f"{p} is a segmentation_models_pytorch save_pretrained folder: convert "
                         f"it first with python weights_port/convert.py {p}")
    raise ValueError(
        f"{p} is neither a unetpp-jax checkpoint (metadata.json + variables/) nor a training "
        "workdir (config.json + checkpoints/); a PyTorch .pth must first be converted with "
        "python weights_port/convert.py")


def load_pretrained(path=None, numerics: Any = None) -> tuple[Any, dict]:
    """``(model, variables)`` from :func:`load_checkpoint` (the bundled model by default)."""
    loaded = load_checkpoint(path, numerics)
    return loaded.model, loaded.variables
