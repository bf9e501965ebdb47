"""What the durable output (fsync of every file and directory before the final rename) costs.

    .venv/bin/python bench/durability.py --size 1 --layout safetensors --repeats 3

On the synthetic checkpoint of `make_checkpoint.py`, best of REPEATS, page cache dropped before each run
when the harness may (root), `sync` before each start so no earlier write is flushed inside a timing:

| variant | what is timed |
|---|---|
| `cp+sync` | `cp -r` of the checkpoint and CLIP folders, then `sync`: the honest floor (data on disk) |
| `convert` | `execute(plan, OUT)` as shipped: write, fsync every file and directory, rename, fsync the parent |
| `convert-nofsync+sync` | the same with the fsync calls removed, then `sync`: the same bytes on disk, flushed at the end |
| `convert-nofsync` | the same with no flush at all (what the converter did before: data possibly still in the page cache) |

The plan is made once (in process, as `convert` does before writing); the times are the writing alone.
Writes a markdown table to stdout and `bench/out/durability.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: warm cache, same for every variant


def _timed(fn) -> float:
    _drop_caches()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=1.0)
    ap.add_argument("--layout", choices=["bin", "safetensors"], default="safetensors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()

    from make_checkpoint import make_checkpoint

    import llava_convert.writer as writer
    from llava_convert.convert import execute, plan_conversion

    src_root = args.out / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(src_root, args.size, args.layout)
    clip = Path(json.loads((src / "config.json").read_text())["mm_vision_tower"])
    plan = plan_conversion(src)
    dst = args.out / "durability-out"
    fsync_tree, fsync_dir = writer._fsync_tree, writer._fsync_dir

    def clean():
        shutil.rmtree(dst, ignore_errors=True)

    def cp_sync():
        dst.mkdir()
        subprocess.run(["cp", "-r", str(src), str(clip), str(dst)], check=True)
        subprocess.run(["sync"], check=True)

    def convert():
        execute(plan, dst, progress=False)

    def convert_nofsync(sync: bool):
        writer._fsync_tree = writer._fsync_dir = lambda *a: None
        try:
            execute(plan, dst, progress=False)
        finally:
            writer._fsync_tree, writer._fsync_dir = fsync_tree, fsync_dir
        if sync:
            subprocess.run(["sync"], check=True)

    variants = {
        "cp+sync": cp_sync,
        "convert": convert,
        "convert-nofsync+sync": lambda: convert_nofsync(True),
        "convert-nofsync": lambda: convert_nofsync(False),
    }
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            clean()
            results[name].append(_timed(fn))
    clean()
    nbytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    best = {k: min(v) for k, v in results.items()}
    report = {"source": str(src), "bytes": nbytes, "repeats": args.repeats, "best_s": best, "all_s": results,
              "root": os.geteuid() == 0}
    (args.out / "durability.json").write_text(json.dumps(report, indent=2))
    print(f"{nbytes / 1e9:.2f} GB {args.layout} checkpoint, best of {args.repeats}, page cache dropped: {report['root']}")
    print("| variant | time s | vs cp+sync |")
    print("|---|---|---|")
    for k, v in best.items():
        print(f"| `{k}` | {v:.2f} | {v / best['cp+sync']:.2f}x |")


if __name__ == "__main__":
    main()
