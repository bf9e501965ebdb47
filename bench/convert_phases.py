"""Where a conversion's time and anonymous memory go, phase by phase, with no profiler overhead.

    .venv/bin/python bench/convert_phases.py SOURCE [--dtype float16] [--quantize nf4] [--warm]

Runs `llava_convert.convert.convert` in this process (after dropping the page cache, unless --warm) with
thin timing wrappers around its stages: imports, `plan_conversion`, `write_metadata` (tokenizer and
processor), `write_shards`, and inside it the kernel copies (`writer._copy_range`) and each computed
entry (`convert.compute_entry`: read, transform, cast, quantize; run on the writer's prefetch thread, so it
can overlap the copies). Prints a table and one JSON line. The output is written to bench/out/phases-out
and removed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402

MB = 1 << 20


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak RssAnon between marks, sampled every 2 ms on a thread."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)

    def take(self) -> int:
        p, self.peak = max(self.peak, rss_anon()), rss_anon()
        return p

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def lean_pad_vocab(tensors, ctx, shape):
    """pad_vocab with bounded scratch: the output is made in its final dtype (one rounding, as the current
    float32 detour + cast), and the float64 column mean is accumulated over 1024-row blocks. Sums of float16
    values are exact in float64 here, so the mean, and every output byte, equal the current transform's."""
    import torch

    (w,) = tensors
    rows, cols = w.shape
    dtype = ctx.get("dtype", torch.float16)  # the benchmark converts to float16
    block = 1024
    acc = torch.zeros(cols, dtype=torch.float64)
    buf = torch.empty(min(rows, block), cols, dtype=torch.float64)
    for i in range(0, rows, block):
        b = buf[: min(block, rows - i)]
        b.copy_(w[i : i + block])
        acc += b.sum(dim=0)
    out = torch.empty(shape, dtype=dtype)
    out[:rows] = w
    out[rows:] = (acc / rows).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--quantize", default=None, help="nf4, fp4 or int8 (if this llava-convert supports it)")
    ap.add_argument("--warm", action="store_true", help="keep the page cache")
    ap.add_argument(
        "--settle", type=float, default=5.0, help="seconds to wait after dropping the cache (run.py)"
    )
    ap.add_argument(
        "--lean-pad-vocab",
        action="store_true",
        help="experiment: replace the pad_vocab transform with the bounded-memory version proposed in the "
        "benchmark report (same bytes), to measure its effect",
    )
    args = ap.parse_args()
    out = HERE / "out" / "phases-out"
    shutil.rmtree(out, ignore_errors=True)
    cold = False if args.warm else measure.drop_caches()
    if cold:
        time.sleep(args.settle)

    t0 = time.perf_counter()
    sampler = Sampler()
    rows: list[tuple[str, float, float]] = []
    last = [time.perf_counter()]

    def mark(name: str) -> None:
        now = time.perf_counter()
        rows.append((name, now - last[0], sampler.take() / MB))
        last[0] = now

    import torch  # noqa: F401

    mark("import torch")
    import llava_convert.convert as cv
    import llava_convert.writer as wr

    mark("import llava_convert.convert")

    acc: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def timed(mod, name: str, key: str):
        fn = getattr(mod, name, None)
        if fn is None:
            return

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    acc[key] += time.perf_counter() - t
                    count[key] += 1

        setattr(mod, name, wrapper)

    if args.lean_pad_vocab:
        import llava_convert.transforms as tf

        name = "pad_vocab"
        tf.TRANSFORMS[name] = tf.Transform(tf.TRANSFORMS[name].shape, lean_pad_vocab)
    timed(wr, "_copy_range", "kernel copies (_copy_range)")
    timed(cv, "compute_entry", "computed entries (compute_entry, prefetch thread)")
    per_entry: list[tuple[float, str]] = []
    ce = cv.compute_entry

    def compute_entry(e, ctx):
        t = time.perf_counter()
        r = ce(e, ctx)
        with lock:
            per_entry.append((time.perf_counter() - t, e.target))
        return r

    cv.compute_entry = compute_entry

    plan_fn, meta_fn, shards_fn = cv.plan_conversion, cv.write_metadata, cv.write_shards

    def plan_wrapped(*a, **k):
        mark("convert() entry")
        r = plan_fn(*a, **k)
        mark("plan_conversion")
        return r

    def meta_wrapped(*a, **k):
        mark("execute: staging")
        r = meta_fn(*a, **k)
        mark("write_metadata (tokenizer, processor)")
        return r

    def shards_wrapped(*a, **k):
        r = shards_fn(*a, **k)
        mark("write_shards")
        return r

    cv.plan_conversion, cv.write_metadata, cv.write_shards = plan_wrapped, meta_wrapped, shards_wrapped
    kw = {"dtype": args.dtype, "progress": False}
    if args.quantize:
        from llava_convert.quantize import QuantSpec

        kw["quantize"] = QuantSpec(quant_type=args.quantize)
    cv.convert(args.source, out, **kw)
    mark("finish (rename into place)")
    sampler.stop()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)

    total = time.perf_counter() - t0
    print(f"{args.source.name}: {size / 1e9:.2f} GB written, {total:.2f} s in-process, cold cache: {cold}")
    print(f"{'phase':52} {'s':>7} {'peak RssAnon MB':>16}")
    for name, dt, peak in rows:
        print(f"{name:52} {dt:7.2f} {peak:16.0f}")
    print("inside write_shards (the prefetch thread overlaps the main thread's copies):")
    for k in acc:
        print(f"  {k:50} {acc[k]:7.2f} s over {count[k]} calls")
    for dt, name in sorted(per_entry, reverse=True)[:5]:
        print(f"    {dt:6.2f} s  {name}")
    print(
        json.dumps(
            {
                "source": str(args.source),
                "cold": cold,
                "total_s": round(total, 2),
                "phases": [{"phase": n, "s": round(d, 3), "peak_anon_mb": round(p)} for n, d, p in rows],
                "inside_write_shards": {k: round(v, 3) for k, v in acc.items()},
                "slowest_entries": [
                    {"s": round(d, 3), "target": n} for d, n in sorted(per_entry, reverse=True)[:5]
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
