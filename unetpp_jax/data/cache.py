"""An on-disk cache of preprocessed datasets, so that a second load does not redo the work.

A cached dataset is one ``.npz`` under ``$UNETPP_JAX_CACHE`` (default ``~/.cache/unetpp-jax``),
``<kind>/<key>.npz``, where ``key`` is the sha256 of the cache format version, the settings, and
every source file's path, size and modification time (ns). Touching, replacing, adding or
removing a source file, or changing a setting, gives a new key; stale entries are left behind
(delete the folder to reclaim the space). Entries are written atomically (temporary file in the
same folder, fsync, rename), so a reader sees a whole entry or none; an unreadable entry is
rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from unetpp_jax.files import write_bytes_atomic

CACHE_VERSION = 1
ENV = "UNETPP_JAX_CACHE"


def cache_dir() -> Path:
    """``$UNETPP_JAX_CACHE`` or ``~/.cache/unetpp-jax``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unetpp-jax"


def file_signature(paths) -> list[tuple[str, int, int]]:
    """``(absolute path, size, mtime_ns)`` of each file, in the order given."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(Path(p).absolute()), st.st_size, st.st_mtime_ns))
    return out


def cache_key(kind: str, settings: dict, signature) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "kind": kind, "settings": settings},
                        sort_keys=True).encode())
    for path, size, mtime in signature:
        h.update(f"\0{path}\0{size}\0{mtime}".encode())
    return h.hexdigest()[:32]


def cache_path(kind: str, key: str) -> Path:
    return cache_dir() / kind / f"{key}.npz"


def load(kind: str, key: str) -> dict | None:
    """The cached arrays (a dict), or None when absent or unreadable."""
    path = cache_path(kind, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # a damaged entry is rebuilt
        return None


def save(kind: str, key: str, arrays: dict) -> Path | None:
    """Write the entry atomically; returns its path, or None if the cache folder is not
    writable (the data is then just not cached)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        return write_bytes_atomic(cache_path(kind, key), buf.getvalue())
    except OSError:
        return None
