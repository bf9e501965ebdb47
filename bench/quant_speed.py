"""Time llava_convert.quant.quantize_weight against bitsandbytes' own CPU quantization.

Usage: python bench/quant_speed.py [--rows 4096] [--cols 11008] [--dtype float16] [--repeat 3]
       [--threads N] [--types nf4,fp4,int8] [--no-double-quant]

For each quant type it reports the best-of-N throughput (input MB/s) of ours and of bitsandbytes
(``functional.quantize_4bit`` + ``QuantState.as_dict(packed=True)`` for 4-bit; ``Int8Params`` moved to
the CPU, i.e. ``int8_vectorwise_quant(w.to(float16))``, for int8), whether the serialized tensors are
byte-identical, and the peak resident memory one call adds on top of the input and the libraries
(outputs included), measured in a fresh subprocess per implementation via VmHWM.

Throughput needs a quiet machine: torch's OpenMP joins stall badly when other processes hold the
cores, which penalizes bitsandbytes (multi-threaded torch ops) more than ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_convert.quant import quantize_weight  # noqa: E402


def make_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)


def bnb_quantize(
    w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if quant_type == "int8":
        # Int8Params quantizes when moved from the CPU to a device ("cpu" counts); this is the path
        # transformers' Bnb8bitQuantize takes. It does not modify ``w``.
        p = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
        return {"weight": p.data, "SCB": p.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    q, state = F.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    out = {"weight": q}
    out.update({"weight." + k: v for k, v in state.as_dict(packed=True).items()})
    return out


def ours(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, threads: int | None):
    return quantize_weight(
        w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, threads=threads
    )


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_child(args: argparse.Namespace, impl: str, quant_type: str) -> float:
    """Peak RSS growth (MB) of one quantization call, in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        impl,
        "--types",
        quant_type,
        "--rows",
        str(args.rows),
        "--cols",
        str(args.cols),
        "--dtype",
        args.dtype,
        "--blocksize",
        str(args.blocksize),
    ]
    if args.no_double_quant:
        cmd.append("--no-double-quant")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs), so the peak covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    w = make_weight(args.rows, args.cols, dtype)
    import bitsandbytes  # noqa: F401  (import cost is not part of the call, for either side)

    if args._child == "ours":
        ours(w[:64], args.types, args.blocksize, not args.no_double_quant, args.threads)  # build tables
    else:
        bnb_quantize(w[:64].clone(), args.types, args.blocksize, not args.no_double_quant)
    use_hwm = _reset_peak() and _status_kb("VmHWM") is not None
    before = _status_kb("VmRSS") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args._child == "ours":
        res = ours(w, args.types, args.blocksize, not args.no_double_quant, args.threads)
    else:
        res = bnb_quantize(w, args.types, args.blocksize, not args.no_double_quant)
    after = _status_kb("VmHWM") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del res
    print(json.dumps({"peak_mb": (after - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--types", default="nf4,fp4,int8")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess peak-RSS measurement")
    ap.add_argument("--_child", choices=["ours", "bnb"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(args)
        return

    dtype = getattr(torch, args.dtype)
    w = make_weight(args.rows, args.cols, dtype)
    mb = w.numel() * w.element_size() / 1e6
    dq = not args.no_double_quant
    print(
        f"tensor {args.rows}x{args.cols} {args.dtype} ({mb:.1f} MB), blocksize {args.blocksize}, "
        f"double_quant {dq}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    header = f"{'type':5} {'ours MB/s':>10} {'bnb MB/s':>9} {'speedup':>8} {'identical':>9}"
    if not args.no_rss:
        header += f" {'ours peak MB':>13} {'bnb peak MB':>12}"
    print(header)
    for qt in args.types.split(","):
        mine = ours(w, qt, args.blocksize, dq, args.threads)
        ref = bnb_quantize(w, qt, args.blocksize, dq)
        same = identical(mine, ref)
        # Alternate the two so a noisy neighbour affects both alike; keep each one's best run.
        t_ours = t_bnb = float("inf")
        for _ in range(args.repeat):
            t_ours = min(t_ours, best_time(lambda qt=qt: ours(w, qt, args.blocksize, dq, args.threads), 1))
            t_bnb = min(t_bnb, best_time(lambda qt=qt: bnb_quantize(w, qt, args.blocksize, dq), 1))
        row = f"{qt:5} {mb / t_ours:10.0f} {mb / t_bnb:9.0f} {t_bnb / t_ours:7.1f}x {str(same):>9}"
        if not args.no_rss:
            row += f" {peak_rss_child(args, 'ours', qt):13.0f} {peak_rss_child(args, 'bnb', qt):12.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
