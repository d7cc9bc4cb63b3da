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
``state_dict`` or a training checkpoint's bookkeeping needs (``collections.OrderedDict``, the
tensor-rebuild functions, storage types and dtypes, numpy scalars, ``argparse.Namespace``) and
maps each to an immutable stand-in defined here, so a file can neither run code nor change the
loader for the files read after it; nothing from ``torch`` is imported, and any other global --
``os.system``, a model class -- is refused before it is called. ``BUILD`` (``__setstate__``) is
honoured only on objects this load created itself (an ``OrderedDict``, a ``Namespace`` or dtype
stand-in); aimed at anything else it is refused.

Hostile sizes are bounded before anything is allocated: only regular files are read (a FIFO or a
device is refused, not waited on); a pickle may be at most :data:`MAX_PICKLE_BYTES`; zip entries'
declared sizes must fit the archive; memo indices live in a dict (the C unpickler allocates an
array as large as the largest index: 4 GB for a 9-byte file). Tensors come back as lazy
:class:`TensorRef` objects whose bounds are checked at load (errors name the key); their bytes are
copied out only on ``numpy()``, so only the tensors actually used are materialised.

All failures are :class:`CheckpointFormatError` with a one-line message that names the file;
names taken from the file are passed through :func:`printable` first.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import io
import math
import os
import pickle
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001

MAX_PICKLE_BYTES = 4 << 20  # a state_dict's pickle is ~20 KB; a training checkpoint's < 1 MB
MAX_NAME_CHARS = 200  # names longer than this are shortened when printed
ZIP_INFLATE_RATIO = 4  # declared uncompressed zip sizes may total at most 4x the file

RESAVE_HINT = ("re-save it in PyTorch as a plain state_dict, e.g. "
               "torch.save(model.state_dict(), 'weights.pth'), and convert that file")


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (one-line message naming the file)."""


class UnsafePickleError(CheckpointFormatError):
    """The pickle references something other than tensors and plain containers: refused."""


def printable(text: Any, limit: int = MAX_NAME_CHARS) -> str:
    """``text`` safe to print: control and other non-printable characters escaped as in ``repr``
    (``\\n``, ``\\x1b``, ``\\u202e``), backslashes doubled, long names shortened.

    Every name read from a file (keys, module names, archive members) goes through this before
    it reaches a terminal, so a key holding a newline and ANSI escapes cannot forge a line.
    """
    s = text if isinstance(text, str) else str(text)
    if len(s) > limit:
        s = s[:limit] + f"...({len(s)} chars)"
    if s.isprintable() and "\\" not in s:
        return s
    return "".join("\\\\" if c == "\\" else c if c.isprintable() else repr(c)[1:-1] for c in s)


def safe_line(text: str) -> str:
    """``text`` unchanged if it is printable (names in it escaped already), else escaped once."""
    return text if text.isprintable() else printable(text, 4000)


# --------------------------------------------------------------------------------------------
# Stand-ins for the few globals a checkpoint pickle references. Shared ones are immutable
# (frozen, slotted: no __dict__ for BUILD to write into); mutable ones are created per load.


@dataclasses.dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class TorchDtype:
    """Stand-in for a ``torch.float32``-style dtype object (used by ``_rebuild_tensor_v3``)."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class AllowedFunction:
    """An allowed global function, wrapped so that the pickle cannot reach the function object
    itself (``BUILD`` on a bare function could rewrite its ``__defaults__`` for later loads)."""

    name: str
    fn: Any

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class InertNamespace:
    """``argparse.Namespace`` as data: its attributes kept in ``fields``, never the real class."""

    __slots__ = ("fields",)

    def __init__(self):
        self.fields: dict[str, Any] = {}

    def _build(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointFormatError("malformed argparse.Namespace record")
        self.fields.update(state)

    def __repr__(self):
        return f"Namespace({len(self.fields)} fields)"


class InertDtype:
    """A numpy dtype record (``numpy.dtype('f8', False, True)`` + its state), numeric kinds only;
    fresh per reference, so its ``BUILD`` (the byte order) touches nothing shared."""

    __slots__ = ("spec", "byteorder")
    _SPEC = re.compile(r"[biuf]\d{1,2}|c\d{1,3}")

    def __init__(self, spec, align=False, copy=True):
        del align, copy
        if not isinstance(spec, str) or not self._SPEC.fullmatch(spec):
            raise UnsafePickleError(f"refused to load: numpy dtype {printable(repr(spec))} is not a "
                                    "plain numeric type; nothing from the file was executed")
        self.spec, self.byteorder = spec, "="

    def _build(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise CheckpointFormatError("malformed numpy dtype record")
        self.byteorder = state[1]

    def numpy(self) -> np.dtype:
        dt = np.dtype(self.spec)
        return dt if self.byteorder in ("|", "=") else dt.newbyteorder(self.byteorder)


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode(text, 'latin1')``: how protocol 2 spells a bytes object (numpy scalars'
    raw data); nothing else is encoded."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > 64:
        raise UnsafePickleError("refused to load: an unexpected _codecs.encode record; nothing "
                                "from the file was executed")
    return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar``: a numpy number from its raw bytes (numeric dtypes only)."""
    if not isinstance(dtype, InertDtype) or not isinstance(data, bytes):
        raise CheckpointFormatError("malformed numpy scalar record")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise CheckpointFormatError("malformed numpy scalar record")
    return np.frombuffer(data, dt)[0]


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
    (or ``np.asarray``) reads, bounds-checks and copies out the strided view. ``name`` is the
    tensor's key in the file (set by :func:`load`), for error messages.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "name")

    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple, dtype):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype = np.dtype(dtype)
        self.name = None

    def __repr__(self):
        return f"TensorRef(shape={self.shape}, dtype={self.dtype})"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _describe(self) -> str:
        named = f"'{printable(self.name)}' " if self.name is not None else ""
        return f"tensor {named}of shape {self.shape}"

    def check_bounds(self) -> int:
        """Raise unless every element lies inside the storage; the storage's element count."""
        data = self.storage.data
        if data is None:
            raise CheckpointFormatError(
                f"{self._describe()}: storage {printable(self.storage.key)} has no data record")
        count = len(data) // self.dtype.itemsize
        if self.size == 0:
            return count
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or min(self.stride, default=0) < 0 or last >= count:
            raise CheckpointFormatError(
                f"{self._describe()} (offset {self.offset}, stride {self.stride}) reaches past "
                f"its storage of {count} elements")
        return count

    def numpy(self) -> np.ndarray:
        """A fresh, native-byte-order, C-contiguous array with this tensor's values."""
        count = self.check_bounds()
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        if self.size > count:  # only overlapping (zero) strides get here: bound the allocation
            raise CheckpointFormatError(
                f"{self._describe()} has {self.size} elements but its storage only {count} "
                "(overlapping strides); refused")
        data = self.storage.data
        dtype = self.dtype if self.storage.byteorder == "little" else self.dtype.newbyteorder(">")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        contiguous = tuple(math.prod(self.shape[k + 1:]) for k in range(len(self.shape)))
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
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointFormatError(f"malformed tensor record: {what} is {printable(repr(value))}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None) -> TensorRef:
    if not isinstance(storage, Storage):
        raise CheckpointFormatError("malformed tensor record: no storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool):
        raise CheckpointFormatError(
            f"malformed tensor record: offset {printable(repr(storage_offset))}")
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
        raise CheckpointFormatError(f"malformed tensor record: dtype {printable(repr(dtype))}")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    if not isinstance(data, TensorRef):
        raise CheckpointFormatError("malformed parameter record: no tensor")
    return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): AllowedFunction("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): AllowedFunction("_rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): AllowedFunction("_rebuild_parameter", _rebuild_parameter),
    # Training checkpoints' bookkeeping, as inert data: np.float64(best_iou), args=Namespace(...).
    ("numpy.core.multiarray", "scalar"): AllowedFunction("numpy scalar", _numpy_scalar),
    ("numpy._core.multiarray", "scalar"): AllowedFunction("numpy scalar", _numpy_scalar),
    ("numpy", "dtype"): InertDtype,
    ("_codecs", "encode"): AllowedFunction("_codecs.encode", _latin1_bytes),
    ("argparse", "Namespace"): InertNamespace,
    **{("torch", name): StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): TorchDtype(name, np.dtype(dt)) for name, dt in _TORCH_DTYPES.items()},
}
_NEWOBJ_CLASSES = (InertNamespace, collections.OrderedDict)  # cls.__new__(cls) is harmless


def _describe_object(obj) -> str:
    for key, value in ALLOWED_GLOBALS.items():
        if value is obj:
            return ".".join(key)
    return type(obj).__name__


class _LimitedReader:
    """A read-only view of a binary stream that refuses to read more than ``limit`` bytes."""

    def __init__(self, file, limit: int):
        self.file, self.left = file, limit

    def _take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CheckpointFormatError(
                f"its pickle is larger than {MAX_PICKLE_BYTES >> 20} MiB; a state_dict's is a few "
                f"KB. If the file is genuine, {RESAVE_HINT}")

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(self.left + 1 if n is None or n < 0 else min(n, self.left + 1))
        self._take(len(data))
        return data

    def readline(self, n: int = -1) -> bytes:
        data = self.file.readline(self.left + 1 if n is None or n < 0 else min(n, self.left + 1))
        self._take(len(data))
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


class RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be vetted
    """An unpickler that resolves globals only from :data:`ALLOWED_GLOBALS` (stand-ins).

    Pickle can only call what ``find_class`` hands it, so refusing here means a malicious
    ``__reduce__`` (``os.system``, ``builtins.eval``, ...) is never called. ``BUILD`` and
    ``NEWOBJ`` are vetted too (see the module docstring). The pure-Python unpickler is used on
    purpose: its memo is a dict, where the C one allocates an array as large as the largest memo
    index the file names. Storages arrive through ``persistent_load`` and become :class:`Storage`
    records shared by key.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, storages: dict[str, Storage] | None = None):
        super().__init__(_LimitedReader(file, MAX_PICKLE_BYTES))
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refused to load: the file contains objects other than tensors "
                f"({printable(module)}.{printable(name)}); nothing from it was executed. "
                f"To convert it, {RESAVE_HINT}") from None

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict:  # a state_dict's `_metadata`: not needed
            if state is not None and not isinstance(state, dict):
                raise CheckpointFormatError("malformed OrderedDict record")
        elif type(inst) in (InertNamespace, InertDtype):  # created by this load: its own state
            inst._build(state)
        else:
            raise UnsafePickleError(
                f"refused to load: the pickle tries to set the state of "
                f"{printable(_describe_object(inst))} (BUILD / __setstate__); nothing from it "
                f"was executed. To convert it, {RESAVE_HINT}")

    def _load_newobj(self, kwargs=None):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in _NEWOBJ_CLASSES or args or kwargs:
            raise UnsafePickleError(
                f"refused to load: the pickle constructs {printable(_describe_object(cls))} "
                f"(NEWOBJ); nothing from it was executed. To convert it, {RESAVE_HINT}")
        self.append(cls())

    def _load_newobj_ex(self):
        self._load_newobj(self.stack.pop())

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise CheckpointFormatError(f"unknown persistent record {printable(str(pid)[:60])}")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise CheckpointFormatError(
                f"unknown persistent record of type {printable(repr(kind))}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if (not isinstance(storage_type, StorageType) or not isinstance(numel, int)
                or isinstance(numel, bool) or numel < 0 or not isinstance(key, (str, int))):
            raise CheckpointFormatError("malformed storage record")
        if view is not None:  # legacy storage views: never written for a state_dict's tensors
            raise CheckpointFormatError("storage views are not supported")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype or storage.numel != numel:
            raise CheckpointFormatError(
                f"storage {printable(key)} is declared twice with different types or sizes")
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
    text = printable(str(exc).splitlines()[0], 160) if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unpickle(file, storages: dict[str, Storage] | None = None):
    if isinstance(file, (bytes, memoryview)):
        file = io.BytesIO(file)
    return RestrictedUnpickler(file, storages).load()


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: list[int]) -> bytes:
    """One archive member, after checking its declared size against what is left of the budget
    (uncompressed sizes may total :data:`ZIP_INFLATE_RATIO` x the file: no zip bomb)."""
    budget[0] -= info.file_size
    if budget[0] < 0:
        raise CheckpointFormatError(
            f"zip member {printable(info.filename)} declares {info.file_size} bytes, more than "
            f"the archive could hold; refused (a zip bomb or a corrupt file)")
    return zf.read(info)


def _load_zip(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        names = list(infos)
        budget = [ZIP_INFLATE_RATIO * len(data)]
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise CheckpointFormatError(
                    f"is a TorchScript archive (torch.jit.save), not a checkpoint; {RESAVE_HINT}")
            raise CheckpointFormatError(
                "is a zip archive but not a PyTorch checkpoint (no <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if infos[pickles[0]].file_size > MAX_PICKLE_BYTES:
            raise CheckpointFormatError(
                f"its pickle {printable(pickles[0])} declares {infos[pickles[0]].file_size} bytes, "
                f"more than {MAX_PICKLE_BYTES >> 20} MiB (a state_dict's is a few KB); refused")
        byteorder = "little"
        if prefix + "byteorder" in infos:
            info = infos[prefix + "byteorder"]
            if info.file_size > 16:
                raise CheckpointFormatError("malformed byteorder record")
            byteorder = _read_member(zf, info, budget).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"unknown byte order {printable(repr(byteorder))}")
        storages: dict[str, Storage] = {}
        obj = _unpickle(_read_member(zf, infos[pickles[0]], budget), storages)
        for key, storage in storages.items():
            name = f"{prefix}data/{key}"
            info = infos.get(name)
            if info is None:
                raise CheckpointFormatError(f"storage record {printable(name)} is missing")
            if info.file_size != storage.nbytes:
                raise CheckpointFormatError(
                    f"storage record {printable(name)} has {info.file_size} bytes, "
                    f"expected {storage.nbytes}")
            storage.data, storage.byteorder = _read_member(zf, info, budget), byteorder
    return obj


def _load_legacy(data: bytes):
    f = io.BytesIO(data)
    if _unpickle(f) != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(
            "is a pickle file but not a PyTorch checkpoint (no PyTorch magic number)")
    version = _unpickle(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(
            f"unsupported legacy protocol version {printable(repr(version)[:40])}")
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
            raise CheckpointFormatError(f"is truncated (storage {printable(key)} is missing)")
        (numel,) = header.unpack_from(data, pos)
        pos += header.size
        if numel != storage.numel:
            raise CheckpointFormatError(
                f"storage {printable(key)} holds {numel} elements, expected {storage.numel}")
        end = pos + storage.nbytes
        if end > len(data):
            raise CheckpointFormatError(
                f"is truncated (storage {printable(key)} needs {storage.nbytes} bytes, "
                f"{len(data) - pos} left)")
        storage.data, storage.byteorder = view[pos:end], "little" if little else "big"
        pos = end
    return obj


def iter_tensors(obj, prefix: str = ""):
    """``(name, TensorRef)`` for every tensor in a loaded object, named by the keys and indices
    that lead to it (``state_dict.conv0_0.conv1.weight``). Shared or cyclic parts are visited once."""
    seen: set[int] = set()
    todo = [(prefix, obj)]
    while todo:
        name, node = todo.pop()
        if isinstance(node, TensorRef):
            yield name, node
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, InertNamespace):
            node = node.fields
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        for k, v in reversed(items):
            todo.append((f"{name}.{k}" if name else str(k), v))


def _read_regular_file(path: Path, source: str) -> bytes:
    """The file's bytes; refuses anything but a regular file before reading (a FIFO would block
    forever, a character device never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointFormatError(f"{source}: no such file") from None
    except OSError as exc:
        raise CheckpointFormatError(
            f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointFormatError(f"{source}: is a directory, not a checkpoint file")
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise CheckpointFormatError(
                f"{source}: is {kind}, not a regular file; save the checkpoint to a file first")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 64 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        errname = errno.errorcode.get(exc.errno, "")
        raise CheckpointFormatError(
            f"{source}: cannot read: {exc.strerror or exc} {errname}".rstrip()) from None
    finally:
        os.close(fd)


def load(path: str | Path) -> TorchCheckpoint:
    """Read a ``torch.save`` file (zip or legacy format) without torch and without executing it.

    Raises :class:`CheckpointFormatError` (one line, naming the file) for a missing file, a
    directory, a FIFO or device, an empty, truncated, oversized or non-PyTorch file, a tensor
    outside its storage (naming its key), and :class:`UnsafePickleError` for a pickle that
    references anything beyond tensors, plain containers and inert bookkeeping.
    """
    path = Path(path)
    source = printable(str(path))
    data = _read_regular_file(path, source)
    if not data:
        raise CheckpointFormatError(f"{source}: is empty (0 bytes)")

    if data[:4] == b"PK\x03\x04" or zipfile.is_zipfile(io.BytesIO(data)):
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise CheckpointFormatError(
                f"{source}: is truncated or corrupt (a zip archive without its central directory)")
        fmt, loader = "zip", _load_zip
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
        for name, ref in iter_tensors(obj):
            ref.name = name
            ref.check_bounds()
    except CheckpointFormatError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    except (EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointFormatError(
            f"{source}: is truncated or corrupt ({_one_line(exc)})") from None
    except zipfile.BadZipFile as exc:
        raise CheckpointFormatError(
            f"{source}: is a corrupt zip archive ({_one_line(exc)})") from None
    except MemoryError:
        raise CheckpointFormatError(f"{source}: needs more memory than is available; refused") from None
    except RecursionError:
        raise CheckpointFormatError(f"{source}: is nested too deeply; refused") from None
    except Exception as exc:  # untrusted input: any other parse failure is a format error
        raise CheckpointFormatError(
            f"{source}: is not a readable PyTorch checkpoint ({_one_line(exc)})") from None
    return TorchCheckpoint(obj=obj, format=fmt, sha256=hashlib.sha256(data).hexdigest(),
                           size_bytes=len(data))
