"""Streaming safetensors writer and atomic output directories.

`safetensors.torch.save_file` needs every tensor of a shard in memory at once, so memory would grow
with the shard size. This writer lays out each shard's header from the plan (names, dtypes, shapes are
known before any data is read), then streams tensors one at a time: untouched tensors are copied
file-to-file by the kernel (`os.copy_file_range`), transformed ones are computed, written and released.
The files it writes are standard safetensors (checked by loading them with `safetensors.safe_open`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import LlavaConvertError
from .mapping import PlanEntry
from .readers import DTYPE_TO_SAFETENSORS

_COPY_CHUNK = 64 << 20


def assign_shards(entries: list[PlanEntry], max_shard_size: int | str) -> dict[str, Any]:
    """Fill `entry.shard` with huggingface_hub's framework-free shard planner; return the index dict."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {e.target: e for e in entries}
    try:
        split = split_state_dict_into_shards_factory(
            by_name,
            get_storage_size=lambda e: e.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as e:
        raise LlavaConvertError(f"--max-shard-size {max_shard_size!r}: {e}") from None
    for name, fname in split.tensor_to_filename.items():
        by_name[name].shard = fname
    total = sum(e.nbytes for e in entries)
    return {"metadata": {"total_size": total, "format": "pt"}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}


def _header(entries: list[PlanEntry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.target] = {
            "dtype": DTYPE_TO_SAFETENSORS[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(src: Path, offset: int, count: int, dst) -> None:
    with open(src, "rb") as fsrc:
        fd_in, fd_out = fsrc.fileno(), dst.fileno()
        try:
            while count > 0:
                n = os.copy_file_range(fd_in, fd_out, min(count, 1 << 30), offset)
                if n == 0:
                    raise LlavaConvertError(f"{src}: file ended early (truncated?)")
                offset += n
                count -= n
            return
        except OSError:
            pass  # copy_file_range is missing on some kernels and file systems: plain copy below
        fsrc.seek(offset)
        while count > 0:
            buf = fsrc.read(min(count, _COPY_CHUNK))
            if not buf:
                raise LlavaConvertError(f"{src}: file ended early (truncated?)")
            dst.write(buf)
            count -= len(buf)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_shards(
    entries: list[PlanEntry],
    out_dir: Path,
    compute: Callable[[PlanEntry], torch.Tensor],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write every shard named by `entry.shard`, in plan order, one tensor in memory at a time."""
    shards: dict[str, list[PlanEntry]] = {}
    for e in entries:
        shards.setdefault(e.shard, []).append(e)
    for fname, group in shards.items():
        with open(out_dir / fname, "wb") as f:
            f.write(_header(group))
            f.flush()
            for e in group:
                if e.passthrough:
                    f.flush()
                    src = e.sources[0]
                    _copy_range(src.path, src.offset, e.nbytes, f)
                else:
                    t = compute(e)
                    if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                        raise AssertionError(f"{e.target}: computed {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
                    f.write(tensor_bytes(t))
                    del t
                on_bytes(e.nbytes)


@contextmanager
def staged_output(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of OUTPUT; rename it into place only if the body completes.

    A failed or interrupted run leaves no OUTPUT behind (and an existing OUTPUT untouched).
    """
    if output.exists() and not force:
        raise LlavaConvertError(f"Cannot write to {output}: it already exists. Pass --force to replace it.")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise LlavaConvertError(f"Cannot write to {output}: {parent} does not exist")
    staging = parent / f".{output.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        old = parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)
