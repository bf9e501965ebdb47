"""Streaming safetensors writer and atomic output directories.

`safetensors.torch.save_file` needs every tensor of a shard in memory at once, so memory would grow
with the shard size. This writer lays out each shard's header from the plan (names, dtypes, shapes are
known before any data is read), then streams tensors one at a time: untouched tensors are copied
file-to-file by the kernel (`os.copy_file_range`), transformed ones are computed, written and released.
The files it writes are standard safetensors (checked by loading them with `safetensors.safe_open`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from . import __version__
from .errors import LlavaConvertError
from .plan import PlanEntry
from .quantize import QUANT_STATE_MAX
from .readers import DTYPE_TO_SAFETENSORS

_COPY_CHUNK = 64 << 20


def assign_shards(entries: list[PlanEntry], max_shard_size: int | str) -> dict[str, Any]:
    """Fill `entry.shard` with huggingface_hub's framework-free shard planner; return the index dict.

    A quantized weight's tensors stay together in one shard (they are produced by one computation).
    """
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
                        path, offset, _ = e.sources[0].byte_range()
                        _copy_range(path, offset, e.nbytes, f)
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
                        _copy_range(*src.byte_range(), f)
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


# ----------------------------------------------------------------------------------------------------------
# Output directories: never overlapping an input, locked, staged, flushed to disk, renamed into place
# ----------------------------------------------------------------------------------------------------------

PROVENANCE_FILE = "provenance.json"
_STAGING_SUFFIX_MAX = len(".partial-4194304") + 1  # "." + OUT's name + ".partial-PID" must fit a file name
_NAME_MAX = 255


@dataclass
class Provenance:
    """What OUTPUT was made from, written to `provenance.json` in OUTPUT.

    `inputs`: `{"role", "path"}` per input directory (SOURCE, --base, the vision tower). `files`: one
    `{"path", "sha256", "role"}` per input file whose bytes went into OUTPUT as they are (tokenizer files,
    copied metadata) or whose contents it was derived from (configs, weights; weights carry no sha256, as
    hashing them would cost a second read of every byte).
    """

    command: str
    inputs: list[dict[str, str]] = field(default_factory=list)
    files: list[dict[str, str | None]] = field(default_factory=list)

    def add_input(self, role: str, path: Path | None) -> None:
        if path is not None:
            self.inputs.append({"role": role, "path": str(Path(path).resolve())})

    def add_file(self, role: str, path: Path, *, hash_it: bool = True) -> None:
        digest = None
        if hash_it:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        self.files.append({"path": str(path), "sha256": digest, "role": role})

    def write(self, out_dir: Path) -> None:
        data = {"tool": "llava-convert", "version": __version__, "command": self.command,
                "inputs": self.inputs, "files": self.files}
        (out_dir / PROVENANCE_FILE).write_text(json.dumps(data, indent=2) + "\n")


def _real_candidates(path: Path) -> set[Path]:
    """PATH lexically and resolved, plus the resolved targets (and their folders) of the symlinks directly in
    it: a Hub cache snapshot's files live in the repo's `blobs/`."""
    out = {Path(os.path.abspath(path)), path.resolve()}
    if path.is_dir():
        try:
            entries = list(os.scandir(path))
        except OSError:
            entries = []
        for e in entries:
            if e.is_symlink():
                real = Path(e.path).resolve()
                out.add(real)
                if path.resolve().parent.name == "snapshots" and real.parent.name == "blobs":
                    out.add(real.parent)  # a Hub cache repo's blobs/: every snapshot of it lives there
    return out


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_disjoint(output: Path | str, inputs: list[tuple[str, Path | None]]) -> None:
    """Refuse an OUTPUT that is, contains or lies inside an input (lexically or through symlinks), or the
    current directory or one above it: replacing it (`--force`) would delete the input.

    Raises:
        LlavaConvertError: naming OUTPUT, the input and its role.
    """
    lexical = Path(os.path.abspath(output))
    outs = {lexical, lexical.parent.resolve() / lexical.name}
    if lexical.is_symlink() or lexical.exists():
        outs.add(lexical.resolve())
    cwd = Path.cwd().resolve()
    for o in outs:
        rel = _relation(o, cwd)
        if rel in ("is", "contains"):
            raise LlavaConvertError(f"Cannot write to {output}: it {rel} the current directory")
    for role, inp in inputs:
        if inp is None:
            continue
        for i in _real_candidates(Path(inp)):
            for o in outs:
                rel = _relation(o, i)
                if rel:
                    raise LlavaConvertError(
                        f"Cannot write to {output}: it {rel} {role} {inp}"
                        + (f" ({i})" if str(i) != os.path.abspath(inp) else "")
                        + "; choose an OUTPUT outside every input"
                    )


class _Lock:
    """An exclusive `flock` on `.OUT.lock` beside OUTPUT: a second run writing the same OUTPUT is refused."""

    def __init__(self, parent: Path, name: str, output: Path):
        self.path = parent / f".{name}.lock"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise LlavaConvertError(f"Cannot write to {output}: {e.strerror} ({self.path})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise LlavaConvertError(
                    f"Cannot write to {output}: another llava-convert run is writing it (lock {self.path})"
                ) from None
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _remove_stale(parent: Path, name: str) -> None:
    """Staging and set-aside directories of OUTPUT left by runs that died (kill -9, power cut). Called with the
    lock held, so no live run owns them."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|old)-\d+")
    for p in parent.iterdir():
        if pattern.fullmatch(p.name):
            print(f"Warning: removing {p}, left by an interrupted run", file=sys.stderr)
            _remove(p)


def _fsync_tree(root: Path) -> None:
    """Every file, then every directory, of ROOT flushed to the disk."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """`renameat2(RENAME_NOREPLACE)`: fails if DST exists (even an empty directory, which plain rename
    replaces). False when the kernel, libc or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _commit(staging: Path, output: Path, *, force: bool, shown: Path | str) -> None:
    appeared = f"Cannot write to {shown}: it appeared while this run was writing; nothing was replaced. "
    if not output.exists() and not output.is_symlink():
        try:
            if not _rename_noreplace(staging, output):
                if output.exists() or output.is_symlink():
                    raise FileExistsError
                staging.rename(output)
            return
        except FileExistsError:
            if not force:
                raise LlavaConvertError(appeared + "Pass --force to replace it.") from None
    elif not force:
        raise LlavaConvertError(appeared + "Pass --force to replace it.")
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    output.rename(old)
    staging.rename(output)
    _remove(old)


@contextmanager
def _signals_held() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextmanager
def staged_output(
    output: Path | str,
    *,
    force: bool,
    inputs: list[tuple[str, Path | None]] = (),  # type: ignore[assignment]
    durable: bool = True,
) -> Iterator[Path]:
    """Yield a staging directory beside OUTPUT; move it into place only when the body completes.

    Guarantees: OUTPUT never is, contains or lies inside an input (checked first, `--force` or not); a lock
    stops a second run writing the same OUTPUT; staging directories of dead runs are removed; a failed or
    interrupted run (the signals the CLI handles included) removes its staging directory and leaves an existing
    OUTPUT untouched; with `durable`, every file and directory is fsync'ed before the rename, so a power cut
    never leaves a complete-looking OUTPUT with short files; an OUTPUT that appeared meanwhile is not replaced
    without `force`; `force` replaces a directory, a file or a symlink (the link, never its target).

    Raises:
        LlavaConvertError: OUTPUT overlaps an input, exists (without `force`), is locked, or cannot be created.
    """
    shown = output
    output = Path(os.path.abspath(output))
    name = output.name
    if not name:
        raise LlavaConvertError(f"Cannot write to {shown}: not a directory name")
    if len(os.fsencode(name)) > _NAME_MAX - _STAGING_SUFFIX_MAX:
        raise LlavaConvertError(
            f"Cannot write to {shown}: name too long ({len(os.fsencode(name))} bytes; at most "
            f"{_NAME_MAX - _STAGING_SUFFIX_MAX})"
        )
    check_disjoint(output, list(inputs))
    parent = output.parent
    if not parent.is_dir():
        raise LlavaConvertError(f"Cannot write to {shown}: {parent} does not exist")
    if (output.exists() or output.is_symlink()) and not force:
        raise LlavaConvertError(f"Cannot write to {shown}: it already exists. Pass --force to replace it.")
    lock = _Lock(parent, name, shown)
    try:
        _remove_stale(parent, name)
        staging = parent / f".{name}.partial-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as e:
            raise LlavaConvertError(f"Cannot write to {shown}: {e.strerror} ({parent})") from None
        try:
            yield staging
            if durable:
                _fsync_tree(staging)
            with _signals_held():  # never stop between setting an old OUTPUT aside and renaming the new one in
                _commit(staging, output, force=force, shown=shown)
            if durable:
                _fsync_dir(parent)
        except OSError as e:  # disk full, quota, file too large, I/O error: one line naming OUTPUT
            _remove(staging)
            where = f" ({e.filename})" if e.filename else ""
            raise LlavaConvertError(f"Cannot write to {shown}: {e.strerror or e}{where}") from None
        except BaseException:
            _remove(staging)
            raise
    finally:
        lock.release()
