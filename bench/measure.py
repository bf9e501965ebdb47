"""Run one command and measure it: wall time, flush time, CPU time, peak anonymous memory, max RSS.

Peak RssAnon is sampled from /proc/PID/status over the whole process tree (summed) every few
milliseconds: anonymous memory is what a whole-model load grows, while the page cache behind memory-mapped
or copied files is reclaimable and is not counted. Max RSS is the kernel's own high-water mark, VmHWM of
each process in the tree (summed; it includes file-backed pages the process mapped and touched), read
until the process exits. (`ru_maxrss` from `wait4` is kept too, but it also counts the memory of the
parent the child was forked from, before its exec.)

Other load on the machine is recorded too (`other_cpu_s`: CPU seconds used by everything else while the
command ran, from /proc/stat), because a shared 2-core machine makes wall times noisy.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (needs root); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def wait_for_quiet(max_wait: float, *, threshold: float = 0.25, window: float = 0.5) -> float:
    """Wait (up to MAX_WAIT s) until the machine's busy CPU over WINDOW s is below THRESHOLD cores.

    The machine may be shared; starting a measurement when others are idle makes it less noisy.
    Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b0 = _busy_ticks()
        time.sleep(window)
        if (_busy_ticks() - b0) / _TICK / window < threshold:
            break
    return time.perf_counter() - t0


def _anon_hwm_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM) of PID in kB; zeros once it is gone."""
    anon = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                    break
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return anon, hwm


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = list(kids)
    for k in kids:
        out += _children(k)
    return out


@dataclass
class Result:
    cmd: list[str]
    rc: int
    wall_s: float
    sync_s: float
    cpu_user_s: float
    cpu_sys_s: float
    peak_anon_mb: float
    max_rss_mb: float
    ru_maxrss_mb: float
    other_cpu_s: float
    cold: bool
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def total_s(self) -> float:
        """Wall time until the output is on disk (the command, then `sync`)."""
        return self.wall_s + self.sync_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total_s"] = round(self.total_s, 3)
        for k in ("wall_s", "sync_s", "cpu_user_s", "cpu_sys_s", "other_cpu_s"):
            d[k] = round(d[k], 3)
        for k in ("peak_anon_mb", "max_rss_mb", "ru_maxrss_mb"):
            d[k] = round(d[k], 1)
        return d


def run(
    cmd: list[str],
    *,
    cold: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    interval: float = 0.003,
    cwd: Path | None = None,
    quiet_wait: float = 0.0,
    settle: float = 0.0,
) -> Result:
    """Run CMD once (after dropping the page cache when COLD and allowed), then `sync`, measuring both.

    Order: wait up to QUIET_WAIT s for the machine to be idle, drop the page cache, sleep SETTLE s, run.
    SETTLE matters on VMs that return free memory to the host (virtio-balloon free page reporting, ~2 s
    after pages are freed): memory touched again after that is slow to fault in, so a command started
    right after the drop (like `cp`) would find fast memory, and one that first spends seconds starting up
    would not. A fixed settle puts every command in the same state."""
    if quiet_wait > 0:
        wait_for_quiet(quiet_wait)
    cold = drop_caches() if cold else False
    os.sync()
    if settle > 0:
        time.sleep(settle)
    stop = threading.Event()
    peak = [0]
    hwm: dict[int, int] = {}
    busy0 = _busy_ticks()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True, errors="replace"
    )

    def sample() -> None:
        n = 0
        tree = [proc.pid]
        while not stop.is_set():
            if n % 50 == 0:
                tree = [proc.pid, *_children(proc.pid)]
            anon = 0
            for p in tree:
                a, h = _anon_hwm_kb(p)
                anon += a
                hwm[p] = max(hwm.get(p, 0), h)
            peak[0] = max(peak[0], anon)
            n += 1
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Read the pipes in threads, so a chatty child cannot block on a full pipe.
    outs: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda k=k, s=s: outs.__setitem__(k, s.read()), daemon=True)
        for k, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    busy = (_busy_ticks() - busy0) / _TICK
    t1 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t1
    cpu = usage.ru_utime + usage.ru_stime
    return Result(
        cmd=[str(c) for c in cmd],
        rc=proc.returncode,
        wall_s=wall,
        sync_s=sync_s,
        cpu_user_s=usage.ru_utime,
        cpu_sys_s=usage.ru_stime,
        peak_anon_mb=peak[0] / 1024,
        max_rss_mb=sum(hwm.values()) / 1024,
        ru_maxrss_mb=usage.ru_maxrss / 1024,
        other_cpu_s=max(0.0, busy - cpu),
        cold=cold,
        stdout_tail=(outs.get("out") or "")[-2000:],
        stderr_tail=(outs.get("err") or "")[-2000:],
    )
