"""Lazy readers for checkpoint files: names, dtypes, shapes and byte ranges, no tensor materialised.

Both formats store each tensor's bytes uncompressed at a known offset, so a reader can tell the writer
"these bytes, in this file" and most tensors go from source to output by a kernel copy
(`os.copy_file_range`), never passing through Python objects. `torch.load(mmap=True)` gives lazy tensors
but not their file offsets, so `.bin` files are read with a restricted unpickler (an allow-list of the
classes a state dict needs, nothing else is ever constructed) over `zipfile`'s directory.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LlavaConvertError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


JSON_MAX_BYTES = 64 << 20  # configs, indexes, tokenizer settings: a few MB at most in any real release
PICKLE_MAX_BYTES = 16 << 20  # a state dict's pickle holds names and shapes: ~150 bytes per tensor


def _finite_float(text: str) -> float:
    x = float(text)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return x


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, path: Path) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, no number that overflows to infinity, bounded nesting.

    Raises:
        LlavaConvertError: naming PATH and what is wrong.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlavaConvertError(f"{path}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise LlavaConvertError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:
        raise LlavaConvertError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlavaConvertError(f"{path}: not valid JSON (nested too deeply)") from None


def read_json_file(path: Path) -> Any:
    """A JSON file of an input directory: checked with `check_input_file`, size-capped, parsed strictly."""
    check_input_file(path)
    try:
        size = path.stat().st_size
        if size > JSON_MAX_BYTES:
            raise LlavaConvertError(f"{path}: {size} bytes, too large for a JSON settings file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LlavaConvertError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LlavaConvertError(f"{path}: a directory, expected a file") from None
    except OSError as e:
        raise LlavaConvertError(f"{path}: cannot read ({e.strerror})") from None
    return parse_json(raw, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of an input directory (`read_json_file`), refused in one line when not an object."""
    data = read_json_file(path)  # strict, size-capped, no symlink out of its directory
    if not isinstance(data, dict):
        raise LlavaConvertError(f"{path}: expected a JSON object")
    return data


def check_input_file(path: Path) -> None:
    """Refuse a file of an input directory that is a symlink leading out of it.

    A link inside the directory is fine, and so is a Hugging Face cache snapshot's link into its own repo's
    `blobs/` (`models--org--name/snapshots/REV/f -> ../../blobs/HASH`). Anything else would read, and copy
    into OUTPUT, a file the user never chose to convert (a token, a key).

    Raises:
        LlavaConvertError: naming the link and where it leads.
    """
    path = Path(path)
    if not path.is_symlink():
        return
    root = path.parent.resolve()
    real = path.resolve()
    if root in real.parents:
        return
    if root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs":
        return
    raise LlavaConvertError(
        f"{path}: a symlink to {real}, outside {root}; refusing to read files from outside the input directory "
        "(copy the file in instead)"
    )


class _Mmaps:
    """One read-only mapping per file, shared by every tensor in it. Page-cache backed, not anonymous memory."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def get(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mm
        return mm


_MMAPS = _Mmaps()


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a checkpoint file, located but not read.

    `offset` is the absolute file offset of the first element of the tensor's storage view;
    `contiguous` tells whether the tensor is the plain byte range `[offset, offset + nbytes)`.
    """

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    stride: tuple[int, ...] | None = None
    storage_numel: int | None = None
    origin: str = field(default="", compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def contiguous(self) -> bool:
        if self.stride is None:
            return True
        expected, acc = [], 1
        for s in reversed(self.shape):
            expected.append(acc)
            acc *= s
        return all(st == ex for st, ex, sz in zip(self.stride, reversed(expected), self.shape, strict=True) if sz != 1)

    def byte_range(self) -> tuple[Path, int, int] | None:
        """(file, offset, length) of the stored bytes when they are the tensor row-major, else None."""
        return (self.path, self.offset, self.nbytes) if self.contiguous else None

    def leaves(self) -> tuple[TensorRef, ...]:
        return (self,)

    def load(self) -> torch.Tensor:
        """The tensor as a read-only view over the file mapping (no copy for contiguous tensors)."""
        mm = _MMAPS.get(self.path)
        with warnings.catch_warnings():
            # The mapping is read-only; every caller copies or casts before writing.
            warnings.simplefilter("ignore", UserWarning)
            if self.contiguous:
                if self.numel == 0:
                    return torch.empty(self.shape, dtype=self.dtype)
                t = torch.frombuffer(mm, dtype=self.dtype, count=self.numel, offset=self.offset)
                return t.reshape(self.shape)
            count = self.storage_numel
            t = torch.frombuffer(mm, dtype=self.dtype, count=count, offset=self.offset)
            return t.as_strided(self.shape, self.stride)


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError
    return x


def read_safetensors(path: Path, origin: str = "") -> dict[str, TensorRef]:
    """Parse a safetensors header into `TensorRef`s, as strictly as the safetensors library itself: every
    range inside the file and of its tensor's size, no two ranges overlapping."""
    check_input_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlavaConvertError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise LlavaConvertError(f"{path}: corrupt or truncated safetensors file (header length {n})")
        header = parse_json(f.read(n), path)
    if not isinstance(header, dict):
        raise LlavaConvertError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    base = 8 + n
    out: dict[str, TensorRef] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise LlavaConvertError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
            continue
        try:
            if not isinstance(info, dict):
                raise ValueError
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(_int(s) for s in info["shape"])
            start, end = (_int(x) for x in info["data_offsets"])
            if len(shape) > 8:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LlavaConvertError(f"{path}: tensor {name!r} has an unreadable header entry {str(info)[:200]}") from None
        ref = TensorRef(name, path, dtype, shape, base + start, origin=origin)
        if start > end or end - start != ref.nbytes or base + end > size:
            raise LlavaConvertError(
                f"{path}: tensor {name!r} lies outside the file or disagrees with its shape "
                "(truncated or corrupt file)"
            )
        out[name] = ref
        if end > start:
            ranges.append((start, end, name))
    ranges.sort()
    for (_, end1, a), (start2, _, b) in zip(ranges, ranges[1:], strict=False):
        if start2 < end1:
            raise LlavaConvertError(f"{path}: tensors {a!r} and {b!r} overlap (corrupt or crafted header)")
    return out


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


class _StateDictUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickles a torch state dict into `TensorRef`s. Only the classes a state dict needs are allowed.

    The pure-Python unpickler, not the C one: the C one sizes its memo table from the index a `LONG_BINPUT`
    names, so a 4-byte index in a hostile pickle allocates and zeroes up to 32 GB. The pure-Python memo is a
    dict; state-dict pickles are a few KB, so the speed difference does not show.
    """

    def __init__(self, file, path: Path, storage_offsets: dict[str, int], origin: str):
        super().__init__(file)
        self._path = path
        self._storage_offsets = storage_offsets
        self._origin = origin

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks, *a: data
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TORCH_STORAGE_DTYPES[name]
        if module == "torch" and name in ("float16", "float32", "bfloat16", "float64"):
            return getattr(torch, name)
        raise LlavaConvertError(
            f"{self._path}: refusing to unpickle {module}.{name}; a weights file should hold only tensors "
            "(re-save it as a plain state dict)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise LlavaConvertError(f"{self._path}: unexpected persistent id {str(pid)[:200]}")
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise LlavaConvertError(f"{self._path}: unsupported storage type {str(dtype)[:100]}")
        if not isinstance(key, str | int) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise LlavaConvertError(f"{self._path}: corrupt storage record {str(pid)[:200]}")
        return _StorageRef(str(key), dtype, numel)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *args):
        if not isinstance(storage, _StorageRef):
            raise LlavaConvertError(f"{self._path}: corrupt tensor record (no storage)")
        if storage.key not in self._storage_offsets:
            raise LlavaConvertError(f"{self._path}: storage {storage.key} is missing (truncated or corrupt file)")
        itemsize = dtype_size(storage.dtype)
        _, member_size = self._storage_offsets[storage.key]
        try:
            storage_offset = _int(storage_offset)
            size, stride = tuple(_int(s) for s in size), tuple(_int(s) for s in stride)
            if len(size) != len(stride) or len(size) > 8:
                raise ValueError
        except (TypeError, ValueError):
            raise LlavaConvertError(f"{self._path}: corrupt tensor record (offset, shape or stride)") from None
        if storage.numel * itemsize > member_size:
            raise LlavaConvertError(
                f"{self._path}: storage {storage.key} declares {storage.numel} elements but holds "
                f"{member_size // itemsize} (corrupt file)"
            )
        if all(size):  # the last element the view reaches must lie inside its own storage
            last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
            if last >= storage.numel:
                raise LlavaConvertError(
                    f"{self._path}: a tensor of shape {size} at offset {storage_offset} runs past its storage "
                    f"{storage.key} ({storage.numel} elements; corrupt file)"
                )
        return TensorRef(
            name="",
            path=self._path,
            dtype=storage.dtype,
            shape=tuple(size),
            offset=self._storage_offsets[storage.key][0] + storage_offset * itemsize,
            stride=tuple(stride),
            storage_numel=max(storage.numel - storage_offset, 0),
            origin=self._origin,
        )


def read_torch_bin(path: Path, origin: str = "") -> dict[str, TensorRef]:
    """Read a `torch.save` zip file (what `pytorch_model*.bin` is) into `TensorRef`s without loading data.

    Every member must be stored uncompressed (torch never compresses; a compressed member could inflate
    without bound), the pickle is size-capped, and every tensor must lie inside its own storage.
    """
    check_input_file(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, EOFError):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x80\x02":
            raise LlavaConvertError(
                f"{path}: legacy (pre-1.6) torch.save format; re-save it with a current torch"
            ) from None
        raise LlavaConvertError(f"{path}: not a torch checkpoint or truncated (bad zip archive)") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise LlavaConvertError(f"{path}: not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        offsets: dict[str, tuple[int, int]] = {}
        size = path.stat().st_size
        with open(path, "rb") as raw:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise LlavaConvertError(
                        f"{path}: zip member {info.filename} is compressed; torch.save never compresses, "
                        "refusing to inflate it"
                    )
                if info.filename == pkl[0] and info.file_size > PICKLE_MAX_BYTES:
                    raise LlavaConvertError(f"{path}: {info.filename} is {info.file_size} bytes, too large for a state dict")
                if not info.filename.startswith(prefix + "data/"):
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise LlavaConvertError(f"{path}: corrupt zip entry {info.filename}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                if start + info.file_size > size:
                    raise LlavaConvertError(f"{path}: truncated (entry {info.filename} runs past the end)")
                offsets[info.filename[len(prefix) + 5 :]] = (start, info.file_size)
        try:
            with zf.open(pkl[0]) as f:
                obj = _StateDictUnpickler(f, path, offsets, origin).load()
        except LlavaConvertError:
            raise
        except RecursionError:
            raise LlavaConvertError(f"{path}: corrupt torch checkpoint (pickle nested too deeply)") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise LlavaConvertError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise LlavaConvertError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, TensorRef] = {}
    for name, ref in obj.items():
        if not isinstance(name, str):
            raise LlavaConvertError(f"{path}: entry {str(name)[:100]} has a name that is not a string")
        if not isinstance(ref, TensorRef):
            raise LlavaConvertError(f"{path}: entry {name!r} is not a tensor")
        end = ref.offset + (ref.storage_numel or 0) * dtype_size(ref.dtype)
        if end > size:
            raise LlavaConvertError(f"{path}: tensor {name!r} runs past the end of the file (truncated)")
        out[name] = TensorRef(name, ref.path, ref.dtype, ref.shape, ref.offset, ref.stride, ref.storage_numel, origin)
    return out


def read_weight_file(path: Path, origin: str = "") -> dict[str, TensorRef]:
    check_input_file(path)
    if not path.is_file():
        raise LlavaConvertError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path, origin)
    return read_torch_bin(path, origin)


WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, from its index when it has one.

    Index files are validated before any shard is opened: shard names must be plain relative names
    inside the directory and every shard must exist.
    """
    for index_name in WEIGHT_INDEX_NAMES:
        index = directory / index_name
        if not index.is_file():
            continue
        weight_map = read_index(index)
        shards = sorted(set(weight_map.values()))
        files = []
        for shard in shards:
            p = Path(shard)
            if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
                raise LlavaConvertError(f"{index}: shard name {shard!r} must be a file name inside {directory}")
            if not (directory / p).is_file():
                raise LlavaConvertError(f"{index}: shard {shard} is listed but missing from {directory}")
            files.append(directory / p)
        return files
    for single in WEIGHT_SINGLE_NAMES:
        if (directory / single).is_file():
            return [directory / single]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if found:
        return found
    raise LlavaConvertError(f"{directory}: no weights found (expected *.safetensors or pytorch_model*.bin)")


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a shard index: tensor names to shard file names, both strings."""
    data = read_json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise LlavaConvertError(f"{index}: unreadable index (no weight_map object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise LlavaConvertError(f"{index}: weight_map[{name!r}] must be a shard file name, found {str(shard)[:100]}")
    return weight_map


def read_checkpoint(directory: Path, origin: str = "", files: list[Path] | None = None) -> dict[str, TensorRef]:
    """All tensors of a checkpoint directory. Keys listed in an index must be in the shard it names."""
    files = files if files is not None else weight_files(directory)
    out: dict[str, TensorRef] = {}
    for f in files:
        for name, ref in read_weight_file(f, origin).items():
            if name in out:
                raise LlavaConvertError(f"{f}: tensor {name!r} also appears in {out[name].path.name}")
            out[name] = ref
    for index_name in WEIGHT_INDEX_NAMES:
        index = directory / index_name
        if index.is_file() and files and files[0].parent == directory:
            weight_map = read_index(index)
            for name, shard in weight_map.items():
                if name not in out or out[name].path.name != shard:
                    raise LlavaConvertError(f"{index}: tensor {name!r} is not in shard {shard}")
            break
    return out


def file_size(path: Path) -> int:
    return os.stat(path).st_size
