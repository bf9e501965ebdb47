"""Benchmarks: llava-convert against `cp`, the upstream in-memory converter and transformers' bnb path.

    .venv/bin/python bench/run.py --sizes 1,4

For each size (GB) and layout (`bin`, `safetensors`) it builds a synthetic original LLaVA-v1.5 checkpoint
with 7B widths (bench/make_checkpoint.py; reused between runs) and measures, one subprocess each:

* `cp`: `cp -r` of the checkpoint and CLIP folders (the I/O floor on this disk);
* `convert`: `llava-convert convert SRC OUT --dtype float16`;
* `upstream`: the in-memory approach of transformers' convert_llava_weights_to_hf.py (bench/upstream_inmemory.py);
* `nf4`, `int8`: `llava-convert convert --quantize nf4|int8` ("n/a" when the installed CLI has no --quantize);
* `hf-nf4`, `hf-int8` (safetensors layout only): transformers' `from_pretrained(..., BitsAndBytesConfig)`
  + `save_pretrained` on the converted float16 output, skipping the same modules (bench/hf_bnb.py).

plus start-up (`llava-convert --help`, a tiny checkpoint's convert) and a quantizer micro-benchmark against
bitsandbytes on the checkpoint's own tensors (bench/quant_micro.py). Each measurement starts with a dropped
page cache when the machine allows it (else warm, and the report says so) and ends with `sync`; `total_s`
is command + sync. Times are the best of --repeats runs; memory the worst. Writes bench/out/results.json
and bench/out/results.md, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_checkpoint as mk  # noqa: E402
import measure  # noqa: E402

MB = 1 << 20
GB = 10**9
ALL_METHODS = ("cp", "convert", "upstream", "nf4", "int8", "hf-nf4", "hf-int8")
GOAL_SLOPE = 1.3
GOAL_TINY_S = 3.0
GOAL_HELP_S = 0.5
GOAL_SPEEDUP_UPSTREAM = 3.0
GOAL_MEMORY_UPSTREAM = 5.0
GOAL_NF4_VS_BNB = 10.0
GOAL_NF4_VS_HF = 2.0
DEFAULT_QUIET_WAIT = 10.0  # seconds to wait, at most, for a shared machine to go idle before each measurement
QUIET_WAIT = DEFAULT_QUIET_WAIT
# Seconds between dropping the page cache and starting a run. This VM returns free memory to the host
# (virtio-balloon free page reporting) about 2 s after it is freed, and memory faulted back in afterwards is
# slow: measured here, `cp` of 4.4 GB took 3.3-3.7 s started right after the drop, 6.6-8.0 s started 15 s
# later. Without a settle, `cp` (which starts copying at once) would get fast memory and `convert` (which
# first spends seconds importing) slow memory. With it, every run starts in the same state.
SETTLE = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
        os.sync()


def python() -> str:
    return sys.executable


def cli() -> list[str]:
    exe = Path(sys.executable).parent / "llava-convert"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llava_convert.cli"]


def quantize_choices(env: dict[str, str]) -> set[str]:
    """The --quantize choices the installed CLI offers (empty when it has no such option)."""
    out = subprocess.run([*cli(), "convert", "--help"], capture_output=True, text=True, env=env).stdout
    m = re.search(r"--quantize\s+\[([^\]]+)\]", out)
    return set(m.group(1).split("|")) if m else set()


def machine(out_dir: Path) -> dict:
    import psutil

    def version(dist: str) -> str:
        # Package metadata, not imports: this process stays small (see `build`).
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(dist)
        except PackageNotFoundError:
            return "not installed"

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    du = shutil.disk_usage(out_dir)
    fs = (
        subprocess.run(["df", "-T", str(out_dir)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()
    )
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "llava_convert"], capture_output=True, text=True, cwd=ROOT
        ).stdout
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "disk": {
            "device": fs[0],
            "fs": fs[1],
            "size_gb": round(du.total / 2**30),
            "free_gb": round(du.free / 2**30),
        },
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "bitsandbytes": version("bitsandbytes"),
        "safetensors": version("safetensors"),
        "tokenizers": version("tokenizers"),
        "llava_convert": f"{version('llava-convert')} @ {rev}{' (+ uncommitted changes)' if dirty else ''}",
        "cp": subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "drop_caches": measure.can_drop_caches(),
        "loadavg_start": os.getloadavg(),
    }


def best(runs: list[measure.Result]) -> dict:
    """Best-of-N times (the least disturbed run), worst-of-N memory."""
    ok = [r for r in runs if r.rc == 0]
    if not ok:
        return {"rc": runs[-1].rc, "error": runs[-1].stderr_tail[-800:]}
    fastest = min(ok, key=lambda r: r.total_s)
    d = fastest.as_dict()
    d.pop("stdout_tail")
    d.pop("stderr_tail")
    d["peak_anon_mb"] = round(max(r.peak_anon_mb for r in ok), 1)
    d["max_rss_mb"] = round(max(r.max_rss_mb for r in ok), 1)
    d["total_s_all"] = [round(r.total_s, 2) for r in runs]
    return d


def phases_of(r: measure.Result) -> dict | None:
    for line in reversed(r.stdout_tail.splitlines()):
        if line.startswith("{") and '"phases"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


class Method:
    """One method's runs at one size and layout."""

    def __init__(self, name: str, cmd: list[str], out: Path, *, cold: bool, env: dict) -> None:
        self.name, self.cmd, self.out, self.cold, self.env = name, cmd, out, cold, env
        self.runs: list[measure.Result] = []
        self.out_bytes = 0
        self.detail = None

    @property
    def failed(self) -> bool:
        return bool(self.runs) and self.runs[-1].rc != 0

    def run_once(self, keep: bool = False) -> None:
        if self.failed:
            return
        remove(self.out)
        if self.name == "cp":
            self.out.mkdir(parents=True)
        r = measure.run(
            self.cmd, cold=self.cold, env=self.env, quiet_wait=QUIET_WAIT, settle=SETTLE if self.cold else 0.0
        )
        self.runs.append(r)
        log(
            f"  {self.name:9} run {len(self.runs)}: rc {r.rc}, {r.wall_s:.2f} s + sync {r.sync_s:.2f} s, "
            f"cpu {r.cpu_user_s + r.cpu_sys_s:.1f} s, anon {r.peak_anon_mb:.0f} MB, maxrss {r.max_rss_mb:.0f} MB, "
            f"other cpu {r.other_cpu_s:.1f} s"
        )
        if r.rc != 0:
            log(f"  {self.name} failed:\n{r.stderr_tail[-1500:]}")
        else:
            self.out_bytes = bytes_under(self.out)
            self.detail = phases_of(r) or self.detail
        if not keep:
            remove(self.out)

    def result(self) -> dict:
        res = best(self.runs)
        res["method"] = self.name
        res["output_bytes"] = self.out_bytes
        if self.detail:
            res["detail"] = self.detail
        return res


def phases(source: Path, env: dict) -> dict | None:
    """bench/convert_phases.py on SOURCE: where convert's time and memory go (in-process, cold cache)."""
    p = subprocess.run(
        [python(), str(HERE / "convert_phases.py"), str(source), "--dtype", "float16"],
        capture_output=True,
        text=True,
        env=env,
    )
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        log(f"convert_phases.py failed:\n{p.stderr[-1500:]}")
        return None


def na(name: str, why: str) -> dict:
    return {"method": name, "na": why}


def build(args: list[str], env: dict) -> Path:
    """Run bench/make_checkpoint.py in a subprocess (this process stays small: a child's max RSS counts
    the memory of the parent it was forked from) and return the folder it prints last."""
    p = subprocess.run(
        [python(), str(HERE / "make_checkpoint.py"), *args], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        raise SystemExit(f"make_checkpoint.py {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def startup(out: Path, env: dict, repeats: int) -> dict:
    log("start-up: llava-convert --help, tiny convert")
    helps = [
        measure.run([*cli(), "--help"], cold=False, env=env, quiet_wait=QUIET_WAIT)
        for _ in range(max(5, repeats))
    ]
    tiny = build(["--tiny", "--out", str(out / "tiny")], env)
    tiny_out = out / "tiny" / "out"
    runs = []
    for _ in range(repeats):
        remove(tiny_out)
        runs.append(
            measure.run(
                [*cli(), "convert", str(tiny), str(tiny_out), "--quiet"],
                cold=False,
                env=env,
                quiet_wait=QUIET_WAIT,
            )
        )
    remove(tiny_out)
    res = {"help": best(helps), "tiny_convert": best(runs)}
    p = subprocess.run(
        [python(), str(HERE / "convert_phases.py"), str(tiny), "--warm"],
        capture_output=True,
        text=True,
        env=env,
    )
    try:
        res["tiny_phases"] = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pass
    log(f"  --help {res['help'].get('wall_s')} s; tiny convert {res['tiny_convert'].get('wall_s')} s")
    return res


def run_matrix(args, env: dict, quant: set[str]) -> tuple[list[dict], dict, dict]:
    src_root = args.out / "src"
    work = args.out / "work"
    src_root.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    clip = src_root / "clip-vit-large-patch14-336"
    rows: list[dict] = []
    micro: dict = {}
    phase_details: dict = {}
    for size in args.sizes:
        for layout in args.layouts:
            t = time.perf_counter()
            src = build(
                [
                    "--size",
                    f"{size:g}",
                    "--layout",
                    layout,
                    "--max-shard-gb",
                    f"{args.max_shard_gb:g}",
                    "--out",
                    str(src_root),
                ],
                env,
            )
            log(f"source {src.name} ready ({time.perf_counter() - t:.0f} s)")
            src_bytes = bytes_under(src) + bytes_under(clip)
            largest = 2 * (mk.VOCAB + 64) * mk.HIDDEN  # the padded float16 embedding / LM head
            meta = {
                "size_gb": size,
                "layout": layout,
                "source": str(src),
                "source_bytes": src_bytes,
                "layers": mk.layers_for_size(size),
                "largest_tensor_bytes": largest,
            }
            keep_hf = None

            def mk_method(name: str, cmd: list[str]) -> Method:
                return Method(name, cmd, work / name, cold=args.cold, env=env)

            # cp and convert alternate, so that both see the same conditions on a shared machine.
            paired = []
            if "cp" in args.methods:
                paired.append(mk_method("cp", ["cp", "-r", str(src), str(clip), str(work / "cp")]))
            if "convert" in args.methods:
                cmd = [*cli(), "convert", str(src), str(work / "convert"), "--dtype", "float16", "--quiet"]
                paired.append(mk_method("convert", cmd))
            for i in range(args.repeats):
                for m in paired:
                    last = i == args.repeats - 1
                    m.run_once(keep=last and m.name == "convert" and layout == "safetensors")
            for m in paired:
                rows.append({**meta, **m.result()})
                if m.name == "convert" and not m.failed and layout == "safetensors":
                    keep_hf = work / f"hf-{size:g}gb"
                    remove(keep_hf)
                    m.out.rename(keep_hf)
            if args.phases and size == max(args.sizes):
                detail = phases(src, env)
                if detail:
                    phase_details[f"{size:g}gb-{layout}"] = detail
            for name in args.methods:
                if name in ("cp", "convert") or name.startswith("hf-"):
                    continue  # hf-*: below, once per size, on the safetensors layout's converted output
                if name == "upstream":
                    m = mk_method(
                        name, [python(), str(HERE / "upstream_inmemory.py"), str(src), str(work / name)]
                    )
                elif name in ("nf4", "int8"):
                    if name not in quant:
                        rows.append({**meta, **na(name, "llava-convert convert has no --quantize " + name)})
                        continue
                    cmd = [
                        *cli(),
                        "convert",
                        str(src),
                        str(work / name),
                        "--dtype",
                        "float16",
                        "--quantize",
                        name,
                    ]
                    m = mk_method(name, [*cmd, "--quiet"])
                else:
                    raise SystemExit(f"unknown method {name}")
                m.run_once(keep=name in ("nf4", "int8") and layout == "safetensors")
                if name in ("nf4", "int8") and not m.failed and layout == "safetensors":
                    shutil.copy(m.out / "config.json", work / f"{name}-config-{size:g}gb.json")
                remove(m.out)
                rows.append({**meta, **m.result()})
            if keep_hf is not None:
                for name in [m for m in args.methods if m.startswith("hf-")]:
                    o = work / name
                    bits = "4" if name == "hf-nf4" else "8"
                    skip_cfg = work / f"{name[3:]}-config-{size:g}gb.json"
                    cmd = [python(), str(HERE / "hf_bnb.py"), str(keep_hf), str(o), "--bits", bits]
                    if skip_cfg.is_file():
                        cmd += ["--skip-modules-from", str(skip_cfg)]
                    m = mk_method(name, cmd)
                    m.run_once()
                    rows.append(
                        {**meta, **m.result(), "source": str(keep_hf), "source_bytes": bytes_under(keep_hf)}
                    )
                if args.micro and not micro:
                    log("quantizer micro-benchmark (ours vs bitsandbytes, same tensors)")
                    p = subprocess.run(
                        [python(), str(HERE / "quant_micro.py"), str(src)],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    try:
                        micro = json.loads(p.stdout.strip().splitlines()[-1])
                    except (IndexError, json.JSONDecodeError):
                        micro = {"error": p.stderr[-1500:]}
                remove(keep_hf)
            if not args.keep_sources:
                remove(src)
    if not args.keep_sources:
        remove(clip)
    remove(work)
    return rows, micro, phase_details


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _row(rows: list[dict], size, layout, method) -> dict | None:
    for r in rows:
        if r["size_gb"] == size and r["layout"] == layout and r["method"] == method:
            return r
    return None


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("rc") == 0


def _fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def goals(rows: list[dict], start: dict, micro: dict, sizes: list[float], layouts: list[str]) -> list[dict]:
    out = []

    def add(goal, target, value, met, gap=""):
        out.append({"goal": goal, "target": target, "measured": value, "met": met, "gap": gap})

    lo, hi = min(sizes), max(sizes)
    for layout in layouts:
        if lo == hi:
            break
        c1, c4 = _row(rows, lo, layout, "convert"), _row(rows, hi, layout, "convert")
        p1, p4 = _row(rows, lo, layout, "cp"), _row(rows, hi, layout, "cp")
        if all(_ok(r) for r in (c1, c4, p1, p4)):
            db = (c4["source_bytes"] - c1["source_bytes"]) / GB
            sc = (c4["total_s"] - c1["total_s"]) / db
            sp = (p4["total_s"] - p1["total_s"]) / db
            goal = f"convert s/GB beyond start-up ≤ {GOAL_SLOPE}× cp's ({layout})"
            if sp <= 0 or sc <= 0:
                # A slope at or below zero is noise, not speed: the two sizes ran under different conditions.
                add(goal, f"≤ {GOAL_SLOPE}×", f"{sc:.2f} vs {sp:.2f} s/GB", None, "inconclusive: noise")
            else:
                ratio = sc / sp
                add(
                    goal,
                    f"≤ {GOAL_SLOPE}×",
                    f"{sc:.2f} vs {sp:.2f} s/GB = {ratio:.2f}×",
                    ratio <= GOAL_SLOPE,
                    "" if ratio <= GOAL_SLOPE else f"{sc - GOAL_SLOPE * sp:.2f} s/GB over",
                )
        q1, q4 = _row(rows, lo, layout, "nf4"), _row(rows, hi, layout, "nf4")
        h1, h4 = _row(rows, lo, layout, "hf-nf4"), _row(rows, hi, layout, "hf-nf4")
        if all(_ok(r) for r in (q1, q4, h1, h4)):
            db = (q4["source_bytes"] - q1["source_bytes"]) / GB
            sq = (q4["total_s"] - q1["total_s"]) / db
            sh = (h4["total_s"] - h1["total_s"]) / db
            if sq > 0 and sh > 0:
                add(
                    f"(info) nf4 s/GB beyond start-up: transformers ÷ llava-convert ({layout})",
                    "–",
                    f"{sh:.2f} ÷ {sq:.2f} s/GB = {sh / sq:.1f}×",
                    None,
                    "",
                )
    tiny = start.get("tiny_convert", {}).get("wall_s")
    if tiny is not None:
        add(
            "tiny-checkpoint convert wall",
            f"≤ {GOAL_TINY_S} s",
            f"{tiny:.2f} s",
            tiny <= GOAL_TINY_S,
            "" if tiny <= GOAL_TINY_S else f"+{tiny - GOAL_TINY_S:.2f} s",
        )
    h = start.get("help", {}).get("wall_s")
    if h is not None:
        add(
            "llava-convert --help wall",
            f"≤ {GOAL_HELP_S} s",
            f"{h:.2f} s",
            h <= GOAL_HELP_S,
            "" if h <= GOAL_HELP_S else f"+{h - GOAL_HELP_S:.2f} s",
        )
    for layout in layouts:
        peaks = {}
        for size in sizes:
            c = _row(rows, size, layout, "convert")
            if not _ok(c):
                continue
            bound = (2 * c["largest_tensor_bytes"] + 300 * 10**6) / MB
            peaks[size] = c["peak_anon_mb"]
            met = c["peak_anon_mb"] <= bound
            add(
                f"convert peak RssAnon ≤ 2× largest tensor + 300 MB ({size:g} GB, {layout})",
                f"≤ {bound:.0f} MB",
                f"{c['peak_anon_mb']:.0f} MB",
                met,
                "" if met else f"+{c['peak_anon_mb'] - bound:.0f} MB",
            )
        if len(peaks) > 1:
            growth = peaks[max(peaks)] - peaks[min(peaks)]
            allowed = max(64, 0.1 * peaks[min(peaks)])
            add(
                f"convert peak RssAnon does not grow with size ({layout})",
                f"+≤ {allowed:.0f} MB",
                f"{peaks[min(peaks)]:.0f} → {peaks[max(peaks)]:.0f} MB",
                growth <= allowed,
                "" if growth <= allowed else f"+{growth:.0f} MB",
            )
    for size in sizes:
        for layout in layouts:
            c, u = _row(rows, size, layout, "convert"), _row(rows, size, layout, "upstream")
            if _ok(c) and _ok(u):
                sp = u["total_s"] / c["total_s"]
                add(
                    f"faster than in-memory upstream ({size:g} GB, {layout})",
                    f"≥ {GOAL_SPEEDUP_UPSTREAM}×",
                    f"{sp:.1f}×",
                    sp >= GOAL_SPEEDUP_UPSTREAM,
                    "" if sp >= GOAL_SPEEDUP_UPSTREAM else f"{sp:.1f}×",
                )
                mem = u["peak_anon_mb"] / max(c["peak_anon_mb"], 1)
                rss = u["max_rss_mb"] / max(c["max_rss_mb"], 1)
                add(
                    f"less peak memory than upstream ({size:g} GB, {layout})",
                    f"≥ {GOAL_MEMORY_UPSTREAM}×",
                    f"RssAnon {mem:.1f}×, max RSS {rss:.1f}×",
                    mem >= GOAL_MEMORY_UPSTREAM,
                    "" if mem >= GOAL_MEMORY_UPSTREAM else f"{mem:.1f}×",
                )
    nf4 = (micro.get("types") or {}).get("nf4")
    if nf4:
        sp = nf4["speedup"]
        add(
            "nf4 quantizer throughput vs bitsandbytes quantize_4bit (same tensors)",
            f"≥ {GOAL_NF4_VS_BNB}×",
            f"{nf4['ours_mb_s']:.0f} vs {nf4['bnb_mb_s']:.0f} MB/s = {sp:.1f}× (identical bytes: {nf4['identical']})",
            sp >= GOAL_NF4_VS_BNB,
            "" if sp >= GOAL_NF4_VS_BNB else f"{sp:.1f}×",
        )
    for size in sizes:
        q, h = _row(rows, size, "safetensors", "nf4"), _row(rows, size, "safetensors", "hf-nf4")
        if _ok(q) and _ok(h):
            sp = h["total_s"] / q["total_s"]
            add(
                f"convert --quantize nf4 vs transformers load-quantize-save ({size:g} GB)",
                f"≥ {GOAL_NF4_VS_HF}×",
                f"{sp:.1f}×",
                sp >= GOAL_NF4_VS_HF,
                "" if sp >= GOAL_NF4_VS_HF else f"{sp:.1f}×",
            )
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    rows = results["rows"]
    lines = [
        "## Benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, {m['disk']['fs']} on {m['disk']['device']} "
        f"({m['disk']['size_gb']} GiB); Linux {m['kernel']}; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}, safetensors {m['safetensors']}; "
        f"llava-convert {m['llava_convert']}; {m['cp']}.",
        "",
        f"Synthetic original LLaVA-v1.5 checkpoints with 7B widths (hidden 4096, intermediate 11008, vocab 32000, "
        f"fewer layers) plus a CLIP-L/14-336 tower folder (0.61 GB, counted in every source size); float16. "
        f"{'Page cache dropped before every run, then ' + str(results.get('settle', 0)) + ' s settle (see run.py: this VM returns freed memory to the host)' if results['cold'] else 'Warm page cache (could not drop caches)'}; "
        f"time = command + `sync`, best of {results['repeats']} for cp/convert (one run otherwise); "
        f"peak RssAnon sampled every 3 ms over the process tree; max RSS = VmHWM. "
        f"Other processes' CPU use during each run is in results.json (`other_cpu_s`): the machine is shared.",
        "",
        "| size (GB read) | layout | method | time s | s/GB | CPU s | peak RssAnon MB | max RSS MB | ÷ cp | ÷ upstream | others' CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['size_gb']:g} GB | {r['layout']} | {r['method']} | n/a | | | | | | | |")
            continue
        if r.get("rc") != 0:
            lines.append(
                f"| {r['size_gb']:g} GB | {r['layout']} | {r['method']} | failed (rc {r.get('rc')}) | | | | | | | |"
            )
            continue
        cp = _row(rows, r["size_gb"], r["layout"], "cp")
        up = _row(rows, r["size_gb"], r["layout"], "upstream")
        vs_cp = r["total_s"] / cp["total_s"] if _ok(cp) and r["method"] != "cp" else None
        vs_up = (
            r["total_s"] / up["total_s"] if _ok(up) and r["method"] in ("convert", "nf4", "int8") else None
        )
        src_gb = r["source_bytes"] / GB
        lines.append(
            f"| {r['size_gb']:g} GB ({src_gb:.2f}) | {r['layout']} | {r['method']} | {r['total_s']:.2f} | "
            f"{r['total_s'] / src_gb:.2f} | {r['cpu_user_s'] + r['cpu_sys_s']:.1f} | {r['peak_anon_mb']:.0f} | "
            f"{r['max_rss_mb']:.0f} | {_fmt(vs_cp)} | {_fmt(vs_up)} | {r['other_cpu_s']:.1f} |"
        )
    lines += [
        "",
        "`hf-nf4` / `hf-int8` start from the converted float16 output (so they do less work than `nf4`/`int8`, "
        "which convert and quantize in one pass); their size column is that output's.",
        "",
    ]
    s = results["startup"]
    if s:
        lines += [
            f"Start-up: `llava-convert --help` {s['help'].get('wall_s', float('nan')):.2f} s; tiny checkpoint convert "
            f"{s['tiny_convert'].get('wall_s', float('nan')):.2f} s wall ({s['tiny_convert'].get('cpu_user_s', 0) + s['tiny_convert'].get('cpu_sys_s', 0):.1f} s CPU).",
            "",
        ]
        if s.get("tiny_phases"):
            ph = " · ".join(
                f"{p['phase']} {p['s']:.2f} s" for p in s["tiny_phases"]["phases"] if p["s"] >= 0.01
            )
            lines += [f"Tiny convert phases (in-process, warm): {ph}.", ""]
    for key, d in (results.get("convert_phases") or {}).items():
        ph = " · ".join(f"{p['phase']} {p['s']:.2f} s" for p in d["phases"] if p["s"] >= 0.05)
        inside = " · ".join(f"{k} {v:.2f} s" for k, v in d["inside_write_shards"].items())
        lines += [
            f"`convert` phases, {key} (in-process, cold cache, {d['total_s']:.1f} s): {ph}; inside write_shards: {inside}.",
            "",
        ]
    micro = results.get("quant_micro") or {}
    if micro.get("types"):
        lines += [
            "| quantizer (same tensors) | ours MB/s | bitsandbytes MB/s | speedup | identical bytes | peak anon MB ours / bnb (gate_proj) |",
            "|---|---:|---:|---:|---|---|",
        ]
        for qt, d in micro["types"].items():
            g = next((t for t in d["tensors"] if t["tensor"] == "mlp.gate_proj"), d["tensors"][0])
            lines.append(
                f"| {qt} | {d['ours_mb_s']:.0f} | {d['bnb_mb_s']:.0f} | {d['speedup']:.1f}× | {d['identical']} | "
                f"{g['ours_peak_anon_mb']:.0f} / {g['bnb_peak_anon_mb']:.0f} |"
            )
        lines.append("")
    if results["goals"]:
        lines += ["| goal | target | measured | met |", "|---|---|---|---|"]
        for g in results["goals"]:
            met = "–" if g["met"] is None else ("yes" if g["met"] else "no")
            if g["met"] is None and g["gap"]:
                met = g["gap"]
            lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {met} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global QUIET_WAIT, SETTLE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--layouts", default="bin,safetensors")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="runs of cp and convert (best time is kept)")
    ap.add_argument("--max-shard-gb", type=float, default=2.0, help="source shard size")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before runs")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=DEFAULT_QUIET_WAIT,
        help="before each run, wait up to this many seconds for the machine to be idle (0: never)",
    )
    ap.add_argument(
        "--settle", type=float, default=SETTLE, help="seconds between dropping the page cache and each run"
    )
    ap.add_argument("--no-startup", action="store_true")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--no-phases", action="store_true", help="skip the in-process phase breakdown of convert")
    ap.add_argument(
        "--keep-sources", action="store_true", help="keep the synthetic checkpoints for the next run"
    )
    args = ap.parse_args()
    args.sizes = [float(s) for s in args.sizes.split(",")]
    args.layouts = args.layouts.split(",")
    args.methods = args.methods.split(",")
    args.micro = not args.no_micro
    args.phases = not args.no_phases
    QUIET_WAIT = args.quiet_wait
    SETTLE = args.settle
    args.cold = not args.warm and measure.can_drop_caches()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    info = machine(args.out)
    log(
        f"machine: {info['cores']} cores, {info['ram_gb']} GiB; drop caches: {info['drop_caches']}; load {info['loadavg_start']}"
    )
    quant = quantize_choices(env)
    if not quant:
        log("NOTE: this llava-convert has no --quantize: nf4/int8 rows are n/a")
    start = {} if args.no_startup else startup(args.out, env, args.repeats)
    rows, micro, phase_details = run_matrix(args, env, quant)
    info["loadavg_end"] = os.getloadavg()
    results = {
        "machine": info,
        "cold": args.cold,
        "repeats": args.repeats,
        "settle": args.settle if args.cold else 0.0,
        "sizes": args.sizes,
        "layouts": args.layouts,
        "startup": start,
        "rows": rows,
        "quant_micro": micro,
        "convert_phases": phase_details,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    results["goals"] = goals(rows, start, micro, args.sizes, args.layouts)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    log(
        f"done in {results['elapsed_s']:.0f} s; wrote {args.out / 'results.json'} and {args.out / 'results.md'}"
    )


if __name__ == "__main__":
    main()
