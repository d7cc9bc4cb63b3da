"""Save and load a model's variables (``{'params', 'batch_stats'}``) with a JSON metadata file.

A checkpoint is a directory::

    <path>/
      metadata.json   # format marker + whatever the caller records (model config, provenance)
      variables/      # an orbax PyTree checkpoint of the variables (plain numpy arrays)

Writing is atomic: everything is written into a temporary directory next to the target,
``.<name>.tmp-<pid>-*``, which is then renamed into place, so a failed or interrupted save leaves
nothing at ``path``. An existing checkpoint is only replaced with ``force=True``: it is first
renamed aside (``.<name>.old-<pid>-*``), the new one renamed in, the old one deleted. Debris of a
writer killed on the way (``kill -9``, power loss) is dealt with by the next save or load of the
same path: temporary folders whose writer process is gone are deleted, and a checkpoint left
renamed aside with nothing at ``path`` is renamed back (the interrupted replacement never
happened). ``force`` never deletes anything but a checkpoint: it refuses a directory that is not
one, and a checkpoint directory holding other files (they are the user's; move them out first).

Used by ``weights_port/convert.py`` (converted UNET-ZOO weights), by training (saving what it
learned) and by :func:`unetpp_jax.model.load_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
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


CALIBRATION_DIR = "calibration"  # saved int8 calibrations of these weights (quant.Calibration)
# What a checkpoint directory may hold; --force replaces only such a directory (calibrations
# belong to the weights they were computed for and go with them).
CHECKPOINT_ENTRIES = {METADATA_FILE, VARIABLES_DIR, CALIBRATION_DIR}
_DEBRIS = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[^/]*")
LEGACY_DEBRIS_AGE_S = 3600  # debris without a writer pid (older versions) is removed after this


class CheckpointExistsError(FileExistsError):
    """The target exists and may not be replaced (no ``force``, or not a checkpoint)."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _debris(path: Path) -> list[tuple[Path, str, bool]]:
    """``(entry, 'tmp'|'old', writer_gone)`` for each leftover of a save to ``path``."""
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = _DEBRIS.fullmatch(entry.name)
        if not m or m["name"] != path.name:
            continue
        if m["pid"] is not None:
            gone = not _pid_alive(int(m["pid"]))
        else:
            try:
                gone = time.time() - entry.lstat().st_mtime > LEGACY_DEBRIS_AGE_S
            except OSError:
                continue
        found.append((entry, m["kind"], gone))
    return found


def recover(path: str | Path) -> list[str]:
    """Undo what an interrupted save to ``path`` left behind; returns what was done.

    With nothing at ``path`` and a checkpoint of a dead writer renamed aside (``.old-``), that
    checkpoint is renamed back; then every leftover of a dead writer is deleted. Leftovers of a
    live writer (a save in progress) are left alone.
    """
    path = Path(path).absolute()
    done = []
    debris = _debris(path)
    if not (path.exists() or path.is_symlink()):
        olds = [e for e, kind, gone in debris if kind == "old" and gone and is_checkpoint(e)]
        if olds:
            newest = max(olds, key=lambda e: e.stat().st_mtime)
            os.rename(newest, path)
            done.append(f"restored {path} from {newest.name} (a replacement was interrupted)")
    for entry, _kind, gone in _debris(path):
        if gone:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass
            done.append(f"removed {entry.name}, left by an interrupted save")
    return done


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_variables`."""
    try:
        return _read_metadata(path).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def ensure_writable(path: str | Path, force: bool = False) -> None:
    """Raise :class:`CheckpointExistsError` unless saving to ``path`` is allowed.

    Allowed: ``path`` does not exist; or ``force`` and ``path`` is an empty directory or an
    existing checkpoint of this format holding nothing else (``metadata.json`` and
    ``variables/`` only: other files are the user's, and replacing the folder would delete them).
    Callers can check this before doing expensive work.
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
    extra = sorted(e.name for e in path.iterdir() if e.name not in CHECKPOINT_ENTRIES)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:3]) + (f" and {len(extra) - 3} more"
                                                          if len(extra) > 3 else "")
        raise CheckpointExistsError(
            f"{path} holds files besides the checkpoint ({shown}); --force would delete them, "
            "so it refuses: move them out of the folder or choose another output")


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
    recover(path)
    ensure_writable(path, force)
    metadata = dict(metadata or {})
    if "format" in metadata:
        raise ValueError("metadata key 'format' is reserved")
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata},
                      indent=2, sort_keys=True) + "\n"
    host = _to_host(variables)

    import orbax.checkpoint as ocp  # deferred: only saving and loading need it

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
        ocp.PyTreeCheckpointer().save(tmp / VARIABLES_DIR, host)
        (tmp / METADATA_FILE).write_text(text)
        if path.exists() or path.is_symlink():
            ensure_writable(path, force)  # re-check: it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-",
                                        dir=path.parent))
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


def _read_metadata(path: str | Path) -> dict:
    file = Path(path) / METADATA_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a {FORMAT} checkpoint (no {METADATA_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return meta


def validate_metadata(meta: Mapping, file: str | Path) -> None:
    """Raise ``ValueError`` naming ``file`` and the field for a wrongly typed top-level field
    (``format``, ``format_version``, and the objects ``model``/``input``/``source``/
    ``conversion``/``training``). The model description's own fields are checked where the
    model is built."""
    fmt = meta.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise ValueError(f"{file}: field 'format' must be a string, got {fmt!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{file}: field 'format_version' must be a positive integer, "
                         f"got {version!r}")
    for field in ("model", "input", "source", "conversion", "training"):
        if field in meta and not isinstance(meta[field], dict):
            raise ValueError(f"{file}: field {field!r} must be an object, got "
                             f"{type(meta[field]).__name__} {meta[field]!r:.60}")


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of the checkpoint at ``path`` (without loading the arrays), its
    top-level fields checked (:func:`validate_metadata`). An interrupted replacement of
    ``path`` is recovered first (:func:`recover`)."""
    recover(path)
    meta = _read_metadata(path)
    validate_metadata(meta, Path(path) / METADATA_FILE)
    return meta


def first_nonfinite(tree: Any) -> tuple[str, int] | None:
    """``(key, count)`` of the first floating-point leaf holding NaN or Inf, or None."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            key = "/".join(str(getattr(k, "key", k)) for k in keypath)
            return key, int(a.size - np.isfinite(a).sum())
    return None


def load_variables(path: str | Path, *, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """``(variables, metadata)`` from a checkpoint written by :func:`save_variables`.

    ``variables`` is a nested dict of ``jax.Array`` with the saved shapes and dtypes (no target
    tree is needed); ``metadata`` is the saved dict, with ``format``/``format_version`` added.
    Raises ``ValueError`` naming the checkpoint and the first bad key if a floating-point
    variable holds NaN or Inf (a diverged run, a corrupt file), unless ``allow_nonfinite``.
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    file = path / METADATA_FILE
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: written by a newer version (format_version "
                         f"{meta['format_version']} > {FORMAT_VERSION})")

    import orbax.checkpoint as ocp

    restored = ocp.PyTreeCheckpointer().restore(path / VARIABLES_DIR)
    if not allow_nonfinite:
        bad = first_nonfinite(restored)
        if bad:
            raise ValueError(f"{path}: variable {bad[0]} holds {bad[1]} non-finite values (NaN/Inf); "
                             "pass allow_nonfinite=True to load it anyway")
    return jax.tree_util.tree_map(jnp.asarray, restored), meta
