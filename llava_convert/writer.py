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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import LlavaConvertError
from .mapping import PlanEntry
from .readers import DTYPE_TO_SAFETENSORS

_COPY_CHUNK = 64 << 20


def assign_shards(entries: list[PlanEntry], max_shard_size: int | str) -> dict[str, Any]:
    """Fill `entry.shard` with huggingface_hub's framework-free shard planner; return the index dict.

    A quantized weight's tensors stay together in one shard (they are produced by one computation).
    """
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
    weight_map = {name: e.shard for e in entries for name, _, _ in e.outputs()}
    total = sum(e.nbytes for e in entries)
    return {"metadata": {"total_size": total, "format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}


def _header(tensors: list[tuple[str, torch.dtype, tuple[int, ...], int]], size: int | None = None) -> bytes:
    """The 8-byte length and JSON header for tensors laid out in order; padded with spaces to `size`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    target = len(raw) + (-len(raw) % 8) if size is None else size
    if len(raw) > target:
        raise AssertionError("safetensors header outgrew its reserved space")
    raw += b" " * (target - len(raw))  # whitespace padding is valid JSON; data starts 8-byte aligned
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
    compute: Callable[[PlanEntry], dict[str, torch.Tensor]],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write every shard named by `entry.shard`, in plan order, one entry's tensors in memory at a time.

    The header space is reserved from the plan's upper bounds, the data streamed after it, and the exact
    header written last (padded with spaces), so data-sized tensors (bitsandbytes quant states) need no
    second pass. Returns the total bytes of tensor data written.
    """
    shards: dict[str, list[PlanEntry]] = {}
    for e in entries:
        shards.setdefault(e.shard, []).append(e)
    from .quantize import QUANT_STATE_MAX

    # One worker computes the next entry (read, cast, quantize) while this thread writes the current one:
    # both cores busy, at most two entries' tensors alive at once.
    computed = [e for group in shards.values() for e in group if not e.passthrough]
    pending: dict[int, Future] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-convert-compute")

    def prefetch(i: int) -> None:
        if i < len(computed) and id(computed[i]) not in pending:
            pending[id(computed[i])] = pool.submit(compute, computed[i])

    written = 0
    next_computed = 0
    try:
        for fname, group in shards.items():
            bound = [
                (name, dtype, shape if shape is not None else (QUANT_STATE_MAX,), _nbytes(dtype, shape or (QUANT_STATE_MAX,)))
                for e in group
                for name, dtype, shape in e.outputs()
            ]
            reserved = len(_header(bound)) - 8
            actual: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
            with open(out_dir / fname, "wb") as f:
                f.seek(8 + reserved)
                for e in group:
                    if e.passthrough:
                        prefetch(next_computed)
                        f.flush()  # the kernel copy writes at the descriptor's position
                        src = e.sources[0]
                        _copy_range(src.path, src.offset, e.nbytes, f)
                        f.seek(0, os.SEEK_END)
                        actual.append((e.target, e.dtype, e.shape, e.nbytes))
                        n = e.nbytes
                    elif e.appends:
                        prefetch(next_computed)
                        tail = pending.pop(id(e)).result()[e.target]
                        next_computed += 1
                        prefetch(next_computed)
                        src = e.sources[0]
                        f.flush()
                        _copy_range(src.path, src.offset, src.nbytes, f)
                        f.seek(0, os.SEEK_END)
                        if tail.dtype != e.dtype or tail.shape[1:] != tuple(e.shape[1:]) or tail.shape[0] + src.shape[0] != e.shape[0]:
                            raise AssertionError(f"{e.target}: appended rows {tail.dtype} {tuple(tail.shape)} do not fit {e.shape}")
                        f.write(tensor_bytes(tail))
                        n = src.nbytes + tail.nbytes
                        actual.append((e.target, e.dtype, e.shape, n))
                        del tail
                    else:
                        prefetch(next_computed)
                        tensors = pending.pop(id(e)).result()
                        next_computed += 1
                        prefetch(next_computed)
                        n = 0
                        for name, dtype, shape in e.outputs():
                            t = tensors.pop(name)
                            if t.dtype != dtype or (shape is not None and tuple(t.shape) != tuple(shape)):
                                raise AssertionError(f"{name}: computed {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
                            f.write(tensor_bytes(t))
                            actual.append((name, dtype, tuple(t.shape), t.nbytes))
                            n += t.nbytes
                            del t
                        if tensors:
                            raise AssertionError(f"{e.target}: unplanned outputs {sorted(tensors)}")
                        del tensors
                    written += n
                    on_bytes(n)
                f.seek(0)
                f.write(_header(actual, reserved))
    finally:
        for fut in pending.values():
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    return written


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


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
