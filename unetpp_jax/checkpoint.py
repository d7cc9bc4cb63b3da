"""Save and load a model's variables (``{'params', 'batch_stats'}``) with a JSON metadata file.

A checkpoint is a directory::

    <path>/
      metadata.json   # format marker + whatever the caller records (model config, provenance)
      variables/      # an orbax PyTree checkpoint of the variables (plain numpy arrays)

Writing is atomic: everything is written into a temporary directory next to the target, which
is then renamed into place, so a failed or interrupted save leaves nothing at ``path``. An
existing checkpoint is only replaced with ``force=True``, and never a directory that is not a
checkpoint of this format (so ``force`` cannot wipe an unrelated folder).

Used by ``weights_port/convert.py`` (converted UNET-ZOO weights), by training (saving what it
learned) and by :func:`unetpp_jax.model.load_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "unetpp-jax-variables"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


class CheckpointExistsError(FileExistsError):
    """The target exists and may not be replaced (no ``force``, or not a checkpoint)."""


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_variables`."""
    try:
        return read_metadata(path).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def ensure_writable(path: str | Path, force: bool = False) -> None:
    """Raise :class:`CheckpointExistsError` unless saving to ``path`` is allowed.

    Allowed: ``path`` does not exist; or ``force`` and ``path`` is an existing checkpoint of
    this format or an empty directory. Callers can check this before doing expensive work.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise CheckpointExistsError(f"{path} already exists; pass --force (force=True) to replace it")
    if path.is_symlink() or not path.is_dir():
        raise CheckpointExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if any(path.iterdir()) and not is_checkpoint(path):
        raise CheckpointExistsError(
            f"{path} exists and is not a {FORMAT} checkpoint; refusing to replace it even with force")


def _to_host(tree: Any) -> Any:
    """Plain nested dicts of numpy arrays (orbax then restores numpy without a target)."""
    if isinstance(tree, Mapping):
        return {str(k): _to_host(v) for k, v in tree.items()}
    return np.asarray(jax.device_get(tree))


def save_variables(path: str | Path, variables: Mapping, metadata: Mapping | None = None, *,
                   force: bool = False) -> Path:
    """Write ``variables`` and ``metadata`` (JSON-serialisable) atomically to the directory ``path``.

    Returns the absolute path written. Raises :class:`CheckpointExistsError` if ``path`` exists
    and ``force`` is false (see :func:`ensure_writable`), ``TypeError`` if the metadata is not
    JSON-serialisable (checked before anything is written).
    """
    path = Path(path).absolute()
    ensure_writable(path, force)
    metadata = dict(metadata or {})
    if "format" in metadata:
        raise ValueError("metadata key 'format' is reserved")
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata},
                      indent=2, sort_keys=True) + "\n"
    host = _to_host(variables)

    import orbax.checkpoint as ocp  # deferred: only saving and loading need it

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
        ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, host)
        (tmp / METADATA_FILE).write_text(text)
        if path.exists() or path.is_symlink():
            ensure_writable(path, force)  # re-check: it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old)  # rename over the empty placeholder
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_tree(tree: Any, reference: Any, context: str = "variables") -> None:
    """Raise ``ValueError`` listing every leaf missing, unexpected or mis-shaped in ``tree``.

    ``reference`` is typically ``jax.eval_shape(model.init, ...)``; only paths and shapes are
    compared, so a checkpoint can be checked against a model before any compute.
    """
    def shapes(t):
        return {jax.tree_util.keystr(p): tuple(np.shape(x))
                for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}

    found, expected = shapes(tree), shapes(reference)
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected {k} {s}" for k, s in found.items() if k not in expected]
    problems += [f"shape {k}: found {found[k]}, expected {s}"
                 for k, s in expected.items() if k in found and found[k] != s]
    if problems:
        raise ValueError(f"{context}: {len(problems)} problems: " + "; ".join(problems))


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of the checkpoint at ``path`` (without loading the arrays)."""
    file = Path(path) / METADATA_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a {FORMAT} checkpoint (no {METADATA_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return meta


def load_variables(path: str | Path) -> tuple[dict, dict]:
    """``(variables, metadata)`` from a checkpoint written by :func:`save_variables`.

    ``variables`` is a nested dict of ``jax.Array`` with the saved shapes and dtypes (no target
    tree is needed); ``metadata`` is the saved dict, with ``format``/``format_version`` added.
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer version (format_version "
                         f"{meta['format_version']} > {FORMAT_VERSION})")

    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(path / VARIABLES_DIR)
    return jax.tree_util.tree_map(jnp.asarray, restored), meta
