"""Fuzzing: the bundled example's config, shard index, pickles and the tower's safetensors header and config,
mutated at random (seeded). Every mutant must end in exit 0 or a clean exit 2 (one line, no traceback, no
"internal error"), within a time bound, leaving nothing behind and its inputs as they were.

In process (click's CliRunner): most mutants are planned (`--dry-run`, where every check on metadata runs);
one in FULL_EVERY is converted for real.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from llava_convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llava-v1.5-tiny"
TOWER = ROOT / "examples" / "clip-tiny"
TIME_BOUND_S = 20  # per mutant; a planned one takes ~0.1 s
FULL_EVERY = 40
MIN_MUTANTS = 2000

VALUES = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, 10**30, -(10**9), 1.5, -0.0, 1e308, "", "x", "64", "F16", "I32",
          "BOOL", None, True, False, [], {}, [1, 2], [[1, 2]], {"a": 1}, "../x", "/etc/passwd", "a" * 300]
RAW_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"[" * 3000, b"\xff\xfe", b'"\\ud800"',
              b"{}", b"null", b"0.0000001"]


class Hang(BaseException):
    """A mutant ran past TIME_BOUND_S (a BaseException: the CLI's last-resort handler must not swallow it)."""


def _on_alarm(signum, frame):
    raise Hang


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(obj, rng: random.Random):
    """A structural mutation: replace, delete, scale, retype or add a value somewhere in OBJ."""
    obj = copy.deepcopy(obj)
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return rng.choice(VALUES)
    path = rng.choice(paths)
    parent, key = _get(obj, path[:-1]), path[-1]
    old = parent[key]
    op = rng.randrange(6)
    if op == 0:
        parent[key] = rng.choice(VALUES)
    elif op == 1:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == 2 and isinstance(old, int | float) and not isinstance(old, bool):
        parent[key] = rng.choice([old + 1, old - 1, -old, old * 1000, old * 2**40, old // 2, 0])
    elif op == 3 and isinstance(parent, dict):
        parent[rng.choice(["x", "vocab_size", "__metadata__", "weight_map", "dtype", "shape"])] = rng.choice(VALUES)
    elif op == 4 and isinstance(old, str):
        parent[key] = rng.choice([old + "x", old[:-1], old.upper(), "", old * 2])
    else:
        parent[key] = type(old)() if old is not None and not isinstance(old, bool) else rng.choice(VALUES)
    return obj


def mutate_bytes(raw: bytes, rng: random.Random, *, lo: int = 0, hi: int | None = None) -> bytes:
    """A byte-level mutation in raw[lo:hi]: flips, insertions, deletions, truncation, a splice of a JSON token."""
    hi = len(raw) if hi is None else hi
    b = bytearray(raw)
    op = rng.randrange(5)
    i = rng.randrange(lo, max(lo + 1, hi))
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(lo, max(lo + 1, hi))
            if j < len(b):
                b[j] ^= 1 << rng.randrange(8)
    elif op == 1:
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 2:
        del b[i : i + rng.randint(1, 16)]
    elif op == 3:
        del b[i:]
    else:
        j = min(len(b), i + rng.randint(0, 6))
        b[i:j] = rng.choice(RAW_TOKENS)
    return bytes(b)


def _st_split(raw: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def _rezip(raw: bytes, pickle_bytes: bytes) -> bytes:
    """The torch.save zip RAW with its data.pkl replaced (checksums recomputed, so the pickle itself is tested)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = pickle_bytes if info.filename.endswith("data.pkl") else src.read(info)
            z.writestr(info.filename, data)
    return out.getvalue()


def _pickle_of(raw: bytes) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(raw))
    return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def make_mutant(kind: str, originals: dict[str, bytes], rng: random.Random) -> tuple[str, bytes]:
    """(file key, mutated bytes) for one mutant of KIND."""
    if kind in ("config", "index", "tower_config"):
        key = {"config": "src/config.json", "index": "src/pytorch_model.bin.index.json",
               "tower_config": "tower/config.json"}[kind]
        raw = originals[key]
        if rng.random() < 0.7:
            obj = json.loads(raw)
            for _ in range(rng.randint(1, 3)):
                obj = mutate_json(obj, rng)
            return key, json.dumps(obj).encode()
        return key, mutate_bytes(raw, rng)
    if kind == "safetensors":
        key = "tower/model.safetensors"
        raw = originals[key]
        header, data = _st_split(raw)
        r = rng.random()
        if r < 0.6:
            obj = json.loads(header)
            for _ in range(rng.randint(1, 2)):
                obj = mutate_json(obj, rng)
            new = json.dumps(obj).encode()
        elif r < 0.9:
            new = mutate_bytes(header, rng)
        else:  # a lying header length
            n = rng.choice([0, 1, len(header) - 1, len(header) + 1, len(raw), 2**63, 2**64 - 1])
            return key, struct.pack("<Q", n) + header + data
        return key, struct.pack("<Q", len(new)) + new + data
    key = f"src/pytorch_model-0000{rng.randint(1, 3)}-of-00003.bin"
    raw = originals[key]
    if rng.random() < 0.75:
        pkl = _pickle_of(raw)
        for _ in range(rng.randint(1, 3)):
            pkl = mutate_bytes(pkl, rng, lo=2)
        return key, _rezip(raw, pkl)
    # the zip structure itself: local header, or the central directory at the end
    lo = rng.choice([0, max(0, len(raw) - 400)])
    return key, mutate_bytes(raw, rng, lo=lo, hi=min(len(raw), lo + 400))


KINDS = {"config": 500, "index": 350, "safetensors": 500, "tower_config": 250, "pickle": 450}


@pytest.mark.slow
def test_fuzz_mutants_end_in_exit_0_or_a_clean_exit_2(tmp_path):
    src, tower, out = tmp_path / "src", tmp_path / "tower", tmp_path / "out"
    shutil.copytree(EXAMPLE, src)
    shutil.copytree(TOWER, tower)
    originals = {f"{d.name}/{p.name}": p.read_bytes() for d in (src, tower) for p in d.iterdir()}
    runner = CliRunner()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    counts = {"ok": 0, "refused": 0, "converted": 0}
    failures = []
    n = 0
    try:
        for kind, count in KINDS.items():
            rng = random.Random(f"llava-convert fuzz {kind}")
            for i in range(count):
                n += 1
                key, mutant = make_mutant(kind, originals, rng)
                target = tmp_path / key
                target.write_bytes(mutant)
                full = n % FULL_EVERY == 0
                args = ["convert", str(src), str(out), "--vision-tower", str(tower), "--quiet"]
                if not full:
                    args.append("--dry-run")
                signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S)
                try:
                    r = runner.invoke(main, args)
                except Hang:
                    failures.append(f"{kind} #{i}: no answer within {TIME_BOUND_S} s")
                    r = None
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if r is not None:
                    lines = r.stderr.strip().splitlines()
                    if r.exit_code == 0:
                        counts["ok"] += 1
                        if full:
                            counts["converted"] += 1
                            if not (out / "config.json").is_file():
                                failures.append(f"{kind} #{i}: exit 0 without an output")
                    elif r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and (
                        "internal error" not in lines[0]
                    ):
                        counts["refused"] += 1
                    else:
                        exc = f"{type(r.exception).__name__}: {r.exception}" if r.exception else ""
                        failures.append(f"{kind} #{i}: exit {r.exit_code} {r.stderr.strip()[-300:]!r} {exc}")
                shutil.rmtree(out, ignore_errors=True)
                leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
                if leftovers:
                    failures.append(f"{kind} #{i}: left {leftovers}")
                    for p in leftovers:
                        shutil.rmtree(tmp_path / p, ignore_errors=True)
                target.write_bytes(originals[key])
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert n >= MIN_MUTANTS, n
    print(counts)
    assert not failures, f"{len(failures)} of {n} mutants failed:\n" + "\n".join(failures[:30])
    # The mutators reach past the first check: some mutants still convert, most are refused.
    assert counts["ok"] > 100 and counts["refused"] > 1000 and counts["converted"] > 5, counts
    for d in (src, tower):
        for p in d.iterdir():
            assert p.read_bytes() == originals[f"{d.name}/{p.name}"]
