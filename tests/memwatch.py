"""Peak anonymous resident memory (RssAnon) of this process, sampled by a thread.

Page-cache-backed file mappings (the memory-mapped source shards) are reclaimable and are not counted;
anonymous memory is what a whole-shard or whole-model load would grow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = rss_anon()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def convert_growth(source, out, *, env: dict | None = None, **kwargs) -> int:
    """The anonymous-memory growth of `convert(SOURCE, OUT, progress=False, **kwargs)` in a fresh interpreter
    (its imports and caches warmed by a `plan_conversion` first, outside the measured window)."""
    plan_kw = {k: str(v) for k, v in kwargs.items() if k == "base"}
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from memwatch import PeakAnon
        from llava_convert.convert import convert, plan_conversion
        plan_conversion({str(source)!r}, **{plan_kw!r})
        with PeakAnon() as m:
            convert({str(source)!r}, {str(out)!r}, progress=False, **{ {k: str(v) for k, v in kwargs.items()}!r})
        print(json.dumps({{"growth": m.growth}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
