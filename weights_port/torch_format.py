"""Read PyTorch ``torch.save`` files without PyTorch, and without running code from them.

Two on-disk formats are read, the ones UNET-ZOO users have:

* **zip** (PyTorch >= 1.6, the default since): a zip archive ``<name>/data.pkl`` (the pickled
  object, storages replaced by persistent ids ``('storage', StorageType, key, location, numel)``)
  plus one raw little-endian record ``<name>/data/<key>`` per storage and an optional
  ``<name>/byteorder`` record.
* **legacy** (PyTorch < 1.6, e.g. UNET-ZOO's PyTorch 1.3, or ``_use_new_zipfile_serialization=False``):
  five concatenated pickles -- magic number, protocol version 1001, ``sys_info`` (byte order),
  the object (persistent ids ``('storage', StorageType, key, location, numel, view_metadata)``),
  the sorted list of storage keys -- followed, for each key in that order, by an int64 element
  count and the storage's raw bytes.

Every pickle is read by :class:`RestrictedUnpickler`, whose ``find_class`` admits only what a
``state_dict`` needs (``collections.OrderedDict``, the tensor-rebuild functions, storage types and
dtypes) and maps each to a stand-in defined here; nothing from ``torch`` is imported, and any other
global -- ``os.system``, a model class, ``argparse.Namespace`` -- is refused before it is called.
Tensors come back as lazy :class:`TensorRef` objects (shape and dtype known at once, bytes read
and bounds-checked on ``numpy()``), so only the tensors actually used are materialised.

All failures are :class:`CheckpointFormatError` with a one-line message that names the file.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001

RESAVE_HINT = ("re-save it in PyTorch as a plain state_dict, e.g. "
               "torch.save(model.state_dict(), 'weights.pth'), and convert that file")


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (one-line message naming the file)."""


class UnsafePickleError(CheckpointFormatError):
    """The pickle references something other than tensors and plain containers: refused."""


# --------------------------------------------------------------------------------------------
# Stand-ins for the few torch globals a state_dict pickle references.


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """Stand-in for a ``torch.float32``-style dtype object (used by ``_rebuild_tensor_v3``)."""

    name: str
    dtype: np.dtype


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,  # raw bytes; the tensor's dtype comes from _rebuild_tensor_v3
}
_TORCH_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64,
}


class Storage:
    """One serialized storage: a flat buffer of ``numel`` elements of ``dtype``.

    ``data`` (a bytes-like object) is attached after unpickling, when the file's storage records
    are located; until then only the declared size is known.
    """

    __slots__ = ("key", "dtype", "numel", "data", "byteorder")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel, self.data = key, np.dtype(dtype), numel, None
        self.byteorder = "little"

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorRef:
    """A tensor as ``torch._utils._rebuild_tensor_v2`` describes it, read lazily.

    ``shape``, ``dtype`` and ``stride`` are available without touching the data; ``numpy()``
    (or ``np.asarray``) reads, bounds-checks and copies out the strided view.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple, dtype):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def numpy(self) -> np.ndarray:
        """A fresh, native-byte-order, C-contiguous array with this tensor's values."""
        data = self.storage.data
        if data is None:
            raise CheckpointFormatError(f"storage {self.storage.key!r} has no data record")
        dtype = self.dtype if self.storage.byteorder == "little" else self.dtype.newbyteorder(">")
        count = len(data) // dtype.itemsize
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= count:
            raise CheckpointFormatError(
                f"tensor of shape {self.shape} (offset {self.offset}, stride {self.stride}) "
                f"reaches past its storage of {count} elements")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        contiguous = tuple(int(np.prod(self.shape[k + 1:], dtype=np.int64))
                           for k in range(len(self.shape)))
        if self.stride == contiguous:
            out = flat[self.offset:self.offset + self.size].reshape(self.shape)
        else:
            out = np.lib.stride_tricks.as_strided(
                flat[self.offset:], self.shape, [s * dtype.itemsize for s in self.stride],
                writeable=False)
        return np.array(out, dtype=self.dtype, order="C", copy=True)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)


def _as_int_tuple(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointFormatError(f"malformed tensor record: {what} is {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None) -> TensorRef:
    if not isinstance(storage, Storage):
        raise CheckpointFormatError("malformed tensor record: no storage")
    if not isinstance(storage_offset, int):
        raise CheckpointFormatError(f"malformed tensor record: offset {storage_offset!r}")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or min(size, default=0) < 0:
        raise CheckpointFormatError(f"malformed tensor record: size {size}, stride {stride}")
    return TensorRef(storage, storage_offset, size, stride,
                     storage.dtype if dtype is None else dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, dtype=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, TorchDtype):
        raise CheckpointFormatError(f"malformed tensor record: dtype {dtype!r}")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    if not isinstance(data, TensorRef):
        raise CheckpointFormatError("malformed parameter record: no tensor")
    return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): TorchDtype(name, np.dtype(dt)) for name, dt in _TORCH_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals only from :data:`ALLOWED_GLOBALS` (stand-ins).

    Pickle can only call what ``find_class`` hands it, so refusing here means a malicious
    ``__reduce__`` (``os.system``, ``builtins.eval``, ...) is never called. Storages arrive
    through ``persistent_load`` and become :class:`Storage` records shared by key.
    """

    def __init__(self, file, storages: dict[str, Storage] | None = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refused to load: the file contains objects other than tensors "
                f"({module}.{name}); nothing from it was executed. To convert it, {RESAVE_HINT}"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise CheckpointFormatError(f"unknown persistent record {str(pid)[:60]!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise CheckpointFormatError(f"unknown persistent record of type {kind!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError("malformed storage record")
        if view is not None:  # legacy storage views: never written for a state_dict's tensors
            raise CheckpointFormatError("storage views are not supported")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = Storage(key, storage_type.dtype, numel)
        return storage


# --------------------------------------------------------------------------------------------
# The two container formats. Loaders raise messages without the file name; load() adds it.


@dataclasses.dataclass
class TorchCheckpoint:
    """What :func:`load` returns: the unpickled object (tensors as :class:`TensorRef`)."""

    obj: Any
    format: str  # "zip" or "legacy"
    sha256: str
    size_bytes: int


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unpickle(file, storages: dict[str, Storage] | None = None):
    if isinstance(file, (bytes, memoryview)):
        file = io.BytesIO(file)
    return RestrictedUnpickler(file, storages).load()


def _load_zip(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointFormatError(
                    f"is a TorchScript archive (torch.jit.save), not a checkpoint; {RESAVE_HINT}")
            raise CheckpointFormatError(
                "is a zip archive but not a PyTorch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"unknown byte order {byteorder!r}")
        storages: dict[str, Storage] = {}
        obj = _unpickle(zf.read(pickles[0]), storages)
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            try:
                record = zf.read(name)
            except KeyError:
                raise CheckpointFormatError(f"storage record {name} is missing") from None
            if len(record) != storage.nbytes:
                raise CheckpointFormatError(
                    f"storage record {name} has {len(record)} bytes, expected {storage.nbytes}")
            storage.data, storage.byteorder = record, byteorder
    return obj


def _load_legacy(data: bytes):
    f = io.BytesIO(data)
    if _unpickle(f) != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(
            "is a pickle file but not a PyTorch checkpoint (no PyTorch magic number)")
    version = _unpickle(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"unsupported legacy protocol version {version!r}")
    sys_info = _unpickle(f)
    little = not isinstance(sys_info, dict) or bool(sys_info.get("little_endian", True))
    storages: dict[str, Storage] = {}
    obj = _unpickle(f, storages)
    keys = _unpickle(f)
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise CheckpointFormatError("storage key list does not match the tensors")
    view = memoryview(data)
    pos = f.tell()
    header = struct.Struct("<q" if little else ">q")  # each storage: int64 numel, then bytes
    for key in map(str, keys):
        storage = storages[key]
        if pos + header.size > len(data):
            raise CheckpointFormatError(f"is truncated (storage {key} is missing)")
        (numel,) = header.unpack_from(data, pos)
        pos += header.size
        if numel != storage.numel:
            raise CheckpointFormatError(
                f"storage {key} holds {numel} elements, expected {storage.numel}")
        end = pos + storage.nbytes
        if end > len(data):
            raise CheckpointFormatError(
                f"is truncated (storage {key} needs {storage.nbytes} bytes, {len(data) - pos} left)")
        storage.data, storage.byteorder = view[pos:end], "little" if little else "big"
        pos = end
    return obj


def load(path: str | Path) -> TorchCheckpoint:
    """Read a ``torch.save`` file (zip or legacy format) without torch and without executing it.

    Raises :class:`CheckpointFormatError` (one line, naming the file) for a missing file, a
    directory, an empty, truncated or non-PyTorch file, and :class:`UnsafePickleError` for a
    pickle that references anything beyond tensors and plain containers.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise CheckpointFormatError(f"{source}: is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointFormatError(f"{source}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointFormatError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointFormatError(f"{source}: is empty (0 bytes)")

    if zipfile.is_zipfile(io.BytesIO(data)):
        fmt, loader = "zip", _load_zip
    elif data[:4] == b"PK\x03\x04":
        raise CheckpointFormatError(
            f"{source}: is truncated or corrupt (a zip archive without its central directory)")
    elif data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        fmt, loader = "legacy", _load_legacy
    elif len(data) > 262 and data[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{source}: is a tar archive (PyTorch < 0.4 format), which is not supported; "
            f"{RESAVE_HINT}")
    else:
        raise CheckpointFormatError(
            f"{source}: is not a PyTorch checkpoint (neither a zip archive nor a pickle)")

    try:
        obj = loader(data)
    except CheckpointFormatError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    except (EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointFormatError(
            f"{source}: is truncated or corrupt ({_one_line(exc)})") from None
    except zipfile.BadZipFile as exc:
        raise CheckpointFormatError(
            f"{source}: is a corrupt zip archive ({_one_line(exc)})") from None
    except Exception as exc:  # untrusted input: any other parse failure is a format error
        raise CheckpointFormatError(
            f"{source}: is not a readable PyTorch checkpoint ({_one_line(exc)})") from None
    return TorchCheckpoint(obj=obj, format=fmt, sha256=hashlib.sha256(data).hexdigest(),
                           size_bytes=len(data))
