"""Read PyTorch checkpoints (``torch.save`` zip archives: .bin, .pth, .pt) without torch, lazily.

Many published weights exist only as PyTorch pickles (VideoBLIP's ``pytorch_model-*.bin``,
Video-LLaMA's and LAVIS's ``.pth`` training files). Such a file is a zip archive: ``data.pkl``
describes the objects, and each tensor storage is a raw little-endian entry ``data/<key>``,
stored uncompressed. The pickle is read by an unpickler that knows only torch's tensor-rebuild
functions, its storage types and ``OrderedDict``; any other global is refused with an error
that names it, so nothing in the file is ever executed. Tensors come back as references to
(storage, offset, shape, stride) and are read from a memory map only when needed, so a
shared storage or a view with an offset costs nothing until it is used. Each layout is checked
against its storage before that: no negative offset, size or stride, every element inside the
storage, and no more bytes once read than the storage holds (or 16 MiB, for broadcast buffers).
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".bin", ".pth", ".pt")

# torch storage class -> (safetensors dtype code, numpy dtype of the raw elements)
STORAGES = {
    "DoubleStorage": ("F64", np.float64), "FloatStorage": ("F32", np.float32),
    "HalfStorage": ("F16", np.float16), "BFloat16Storage": ("BF16", np.uint16),
    "LongStorage": ("I64", np.int64), "IntStorage": ("I32", np.int32), "ShortStorage": ("I16", np.int16),
    "CharStorage": ("I8", np.int8), "ByteStorage": ("U8", np.uint8), "BoolStorage": ("BOOL", np.bool_),
}


# A tensor may read to more bytes than its storage holds (a stride-0 ``expand``, overlapping windows)
# only up to this; torch.save writes such views as they are, and they are rare and small in checkpoints.
EXPANSION_LIMIT = 1 << 24
# No real size, stride or offset comes near this many elements (2 PiB of bytes); larger ones overflow numpy.
LAYOUT_LIMIT = 1 << 48


class TorchCheckpointError(ValueError):
    """A PyTorch checkpoint that cannot (or must not) be read; the message names the file."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _Storage:
    """One storage of the archive: where its raw elements start in the file and how many there are."""

    path: Path
    file_offset: int
    count: int
    dtype: str
    element: type

    def elements(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(0, self.element)
        return np.memmap(self.path, dtype=self.element, mode="r", offset=self.file_offset, shape=(self.count,))


@dataclass
class TorchTensor:
    """A tensor of the archive, read on demand: ``raw()`` in its stored dtype (bf16 as uint16),
    ``read()`` as numpy (bf16 widened to float32, as numpy has no bfloat16)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def raw(self) -> np.ndarray:
        base = self.storage.elements()
        if not self.shape:
            return np.array(base[self.offset])
        if any(d == 0 for d in self.shape):
            return np.zeros(self.shape, base.dtype)
        # a length-1 dimension never steps, whatever stride it was saved with
        strides = [0 if d == 1 else s * base.itemsize for d, s in zip(self.shape, self.stride)]
        view = np.lib.stride_tricks.as_strided(base[self.offset:], self.shape, strides, writeable=False)
        return np.ascontiguousarray(view)

    def read(self) -> np.ndarray:
        raw = self.raw()
        return (raw.astype(np.uint32) << 16).view(np.float32) if self.dtype == "BF16" else raw


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> TorchTensor:
    return TorchTensor(storage, offset, size, stride)  # checked by _layout_problem before any read


def _layout_problem(t: TorchTensor) -> str | None:
    """Why reading this tensor's (offset, shape, stride) from its storage would be unsafe, if it would."""
    layout = f"shape {t.shape!r}, stride {t.stride!r}, storage offset {t.offset!r}"
    if not (isinstance(t.storage, _Storage) and isinstance(t.shape, tuple) and isinstance(t.stride, tuple)
            and len(t.shape) == len(t.stride) and all(type(v) is int for v in (t.offset, *t.shape, *t.stride))):
        return f"has a malformed layout ({layout})"
    if min((t.offset, *t.shape, *t.stride)) < 0:
        return f"has a negative size, stride or offset ({layout})"
    if max((t.offset, *t.shape, *(s for d, s in zip(t.shape, t.stride) if d > 1))) >= LAYOUT_LIMIT \
            or math.prod(d for d in t.shape if d) >= LAYOUT_LIMIT:
        return f"has an implausible size, stride or offset, {LAYOUT_LIMIT} elements or more ({layout})"
    count, numel = t.storage.count, math.prod(t.shape)
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride)) if numel else t.offset - 1
    if last >= count:
        return f"reaches element {last}, past its storage of {count} elements ({layout})"
    itemsize = np.dtype(t.storage.element).itemsize
    if numel * itemsize > max(count * itemsize, EXPANSION_LIMIT):
        return (f"repeats its storage of {count} elements to {numel}, {numel * itemsize} bytes once read; "
                f"refusing more than {EXPANSION_LIMIT} ({layout})")
    return None


def _rebuild_parameter(data: TorchTensor, *_: Any) -> TorchTensor:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path, storages: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.storages = storages  # key -> (file offset, byte length)
        self.opened: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise TorchCheckpointError(f"{self.path} refers to {module}.{name}, which a checkpoint of tensors does "
                                   f"not need; refusing to load it (it could run code). Re-save the state dict "
                                   f"alone, or convert it where torch is installed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[4]) is int and pid[4] >= 0):
            raise TorchCheckpointError(f"{self.path}: unknown persistent record {pid!r}")
        _, kind, key, _, count = pid
        if key not in self.opened:
            if key not in self.storages:
                raise TorchCheckpointError(f"{self.path}: storage data/{key} is missing from the archive")
            offset, length = self.storages[key]
            dtype, element = STORAGES[kind.name]
            if length < count * np.dtype(element).itemsize:
                raise TorchCheckpointError(f"{self.path}: storage data/{key} is cut short; the file is damaged")
            self.opened[key] = _Storage(self.path, offset, count, dtype, element)
        return self.opened[key]


def _entry_offset(handle: Any, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start in the file: after its local header, name and extra field."""
    handle.seek(info.header_offset)
    header = handle.read(30)
    if header[:4] != b"PK\x03\x04":
        raise TorchCheckpointError(f"bad zip entry {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _load(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        with open(path, "rb") as f:
            legacy = f.read(2) == b"\x80\x02"
        problem = ("it is in torch's legacy (pre-1.6) format; re-save it with a recent torch" if legacy else
                   f"it is not a torch.save zip archive ({exc}); a download cut short?")
        raise TorchCheckpointError(f"cannot read {path}: {problem}") from exc
    with archive, open(path, "rb") as handle:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{path} holds {len(pickles)} data.pkl entries; expected one")
        root = pickles[0][: -len("data.pkl")]
        order = root + "byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise TorchCheckpointError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        storages = {}
        for info in archive.infolist():
            if info.filename.startswith(root + "data/"):
                if info.compress_type != zipfile.ZIP_STORED:
                    raise TorchCheckpointError(f"{path}: entry {info.filename} is compressed; torch never writes "
                                               f"that, so the file was re-packed: re-save it with torch.save")
                storages[info.filename[len(root) + 5:]] = (_entry_offset(handle, info), info.file_size)
        return _Unpickler(archive.read(pickles[0]), path, storages).load()


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, TorchTensor) for v in value.values())


def read_state_dict(path: str | Path) -> dict[str, TorchTensor]:
    """The tensors of a torch checkpoint, by name. A training file's ``model`` (or ``state_dict``)
    entry is used when the top level is not itself a state dict; entries that are not tensors
    (step counters and the like inside it) are skipped."""
    path = Path(path)
    try:
        obj = _load(path)
    except (pickle.UnpicklingError, EOFError, struct.error) as exc:
        raise TorchCheckpointError(f"{path} is damaged ({exc}); fetch it again") from exc
    if not _is_state_dict(obj) and isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise TorchCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, TorchTensor)}
    if not tensors:
        raise TorchCheckpointError(f"{path} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    for name, tensor in tensors.items():
        problem = _layout_problem(tensor)
        if problem:
            raise TorchCheckpointError(f"{path}: tensor {name!r} {problem}; the file is damaged or crafted")
    return tensors
