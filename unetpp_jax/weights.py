"""Where evaluation finds weights: the bundled checkpoint, a checkpoint directory, or a training
run's best checkpoint — resolved in one place, with errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import importlib.resources

BUNDLED_NAME = "unetpp_dsb2018_96"


def bundled_checkpoint_path() -> Path:
    """Directory of the bundled fp32 checkpoint (``unetpp_jax/assets/weights/<name>``)."""
    return Path(str(importlib.resources.files("unetpp_jax") / "assets" / "weights" / BUNDLED_NAME))


def resolve_checkpoint(path=None):
    """``(model, variables, name)`` for ``path``: None (the bundled weights), a checkpoint
    directory (``metadata.json`` + ``variables/``, as written by ``weights_port/convert.py`` or
    ``experiments.export``), or a training workdir (its best checkpoint)."""
    from unetpp_jax.checkpoint import is_checkpoint
    from unetpp_jax.model import load_pretrained

    if path is None:
        p = bundled_checkpoint_path()
        if not is_checkpoint(p):
            raise FileNotFoundError(
                f"no bundled checkpoint at {p}: this version ships none yet. Pass --checkpoint DIR "
                "(convert a UNET-ZOO .pth with weights_port/convert.py, or train one with "
                "python -m experiments.train)")
        model, variables = load_pretrained(p)
        return model, variables, f"bundled ({p.name})"
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if is_checkpoint(p):
        model, variables = load_pretrained(p)
        return model, variables, str(p)
    if (p / "config.json").is_file() and (p / "checkpoints" / "best").is_dir():
        from unetpp_jax.train import load_best

        model, variables = load_best(p)
        return model, variables, f"{p} (best epoch)"
    raise ValueError(
        f"{p} is neither a unetpp-jax checkpoint (metadata.json + variables/) nor a training "
        "workdir (config.json + checkpoints/best); a PyTorch .pth must first be converted with "
        "python weights_port/convert.py")
