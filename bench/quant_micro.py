"""llava-convert's quantizer against bitsandbytes' own CPU quantization, on a checkpoint's real tensors.

    .venv/bin/python bench/quant_micro.py SOURCE_DIR [--types nf4,int8]

Takes layer 0's q_proj (4096x4096), gate_proj (11008x4096) and down_proj (4096x11008) from an original
checkpoint and quantizes each once with `llava_convert.quant.quantize_weight` and once with bitsandbytes
(`functional.quantize_4bit(blocksize=64, compress_statistics=True)` + `QuantState.as_dict(packed=True)`
for nf4; `Int8Params(...).to("cpu")` for int8), after a warm-up call on a small slice. Prints one JSON
object: per tensor and in total, seconds, MB/s of float16 input, whether the bytes are identical, and
each call's peak growth of anonymous memory (sampled in-process).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    def __enter__(self):
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_anon())


def load_tensors(source: Path) -> dict[str, torch.Tensor]:
    from llava_convert.readers import read_checkpoint

    refs = read_checkpoint(source)
    return {n: refs[f"model.layers.0.{n}.weight"].load().clone() for n in NAMES}


def bnb_quantize(w: torch.Tensor, quant_type: str) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if quant_type == "int8":
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return {"weight": p.data, "SCB": p.SCB}
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    return {"weight": q, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}


def ours(w: torch.Tensor, quant_type: str) -> dict[str, torch.Tensor]:
    from llava_convert.quant import quantize_weight

    out = quantize_weight(w, quant_type=quant_type, blocksize=64, double_quant=True)
    return {k: v for k, v in out.items() if k != "weight_format"}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if sorted(a) != sorted(b):
        return False
    return all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--types", default="nf4,int8")
    args = ap.parse_args()
    import bitsandbytes  # noqa: F401  (imported before timing, for both sides)

    tensors = load_tensors(args.source)
    report: dict = {"threads": torch.get_num_threads(), "types": {}}
    for qt in args.types.split(","):
        small = next(iter(tensors.values()))[:64].clone()
        ours(small, qt)
        bnb_quantize(small, qt)
        rows, tot = [], {"ours_s": 0.0, "bnb_s": 0.0, "mb": 0.0}
        for name, w in tensors.items():
            mb = w.nbytes / 1e6
            with Peak() as m1:
                t = time.perf_counter()
                a = ours(w, qt)
                t_ours = time.perf_counter() - t
            with Peak() as m2:
                t = time.perf_counter()
                b = bnb_quantize(w, qt)
                t_bnb = time.perf_counter() - t
            same = identical(a, b)
            del a, b
            rows.append(
                {
                    "tensor": name,
                    "shape": list(w.shape),
                    "mb": round(mb, 1),
                    "ours_s": round(t_ours, 3),
                    "bnb_s": round(t_bnb, 3),
                    "ours_mb_s": round(mb / t_ours, 1),
                    "bnb_mb_s": round(mb / t_bnb, 1),
                    "speedup": round(t_bnb / t_ours, 2),
                    "identical": same,
                    "ours_peak_anon_mb": round((m1.peak - m1.base) / 2**20, 1),
                    "bnb_peak_anon_mb": round((m2.peak - m2.base) / 2**20, 1),
                }
            )
            tot["ours_s"] += t_ours
            tot["bnb_s"] += t_bnb
            tot["mb"] += mb
        report["types"][qt] = {
            "tensors": rows,
            "ours_mb_s": round(tot["mb"] / tot["ours_s"], 1),
            "bnb_mb_s": round(tot["mb"] / tot["bnb_s"], 1),
            "speedup": round(tot["bnb_s"] / tot["ours_s"], 2),
            "identical": all(r["identical"] for r in rows),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
