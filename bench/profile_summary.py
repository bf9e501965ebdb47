"""Summarise a py-spy collapsed-stack profile (`py-spy record -f raw`) as inclusive time per frame.

    .venv/bin/python bench/profile_summary.py PROFILE.raw [--rate 200] [--top 25] [--match llava_convert]

py-spy's raw format is one line per distinct stack: `frame;frame;...;frame COUNT`. A frame's inclusive
share is the fraction of samples whose stack contains it (counted once per stack, so recursion does not
double count). With `py-spy record --idle`, samples include time spent waiting (I/O, sleeps).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


KEEP_LINES = False


def frame_key(frame: str) -> str:
    """`func (path/file.py:123)` -> `func (path/file.py)`: aggregate over lines of the same function
    (unless --lines)."""
    return frame if KEEP_LINES else _LINE.sub(")", frame)


def load(path: Path, *, main_only: bool = False) -> list[tuple[list[str], int]]:
    """Stacks and sample counts; MAIN_ONLY drops threads started by `threading` (worker pools, tqdm's
    monitor), so that with `--idle` the total is the main thread's wall time."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip():
            continue  # samples with no Python frame (native threads)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if (
            main_only
            and frames
            and frames[0].startswith(("Thread._bootstrap (threading.py", "_bootstrap (threading.py"))
        ):
            continue
        stacks.append((frames, int(count)))
    return stacks


def inclusive(stacks: list[tuple[list[str], int]]) -> Counter:
    inc: Counter = Counter()
    for frames, n in stacks:
        for key in {frame_key(f) for f in frames}:
            inc[key] += n
    return inc


def leaf_self(stacks: list[tuple[list[str], int]], match: str) -> Counter:
    """Self time attributed to the innermost frame matching `match` (e.g. the project's own code)."""
    out: Counter = Counter()
    for frames, n in stacks:
        owner = next((frame_key(f) for f in reversed(frames) if match in f), "(outside)")
        out[owner] += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy sampling rate (-r) used, samples/s")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--match", default="", help="only list frames containing this string")
    ap.add_argument("--main-only", action="store_true", help="ignore threads started with `threading`")
    ap.add_argument("--lines", action="store_true", help="keep line numbers (attribute time to lines)")
    args = ap.parse_args()
    global KEEP_LINES
    KEEP_LINES = args.lines
    stacks = load(args.profile, main_only=args.main_only)
    total = sum(n for _, n in stacks)
    print(f"{total} samples = {total / args.rate:.2f} s at {args.rate:g} Hz")
    inc = inclusive(stacks)
    print(f"\ninclusive (frames containing {args.match!r}):" if args.match else "\ninclusive:")
    shown = 0
    for key, n in inc.most_common():
        if args.match and args.match not in key:
            continue
        print(f"  {n / args.rate:7.2f} s {100 * n / total:5.1f}%  {key}")
        shown += 1
        if shown >= args.top:
            break
    if args.match:
        print(f"\nattributed to the innermost {args.match!r} frame:")
        for key, n in leaf_self(stacks, args.match).most_common(args.top):
            print(f"  {n / args.rate:7.2f} s {100 * n / total:5.1f}%  {key}")


if __name__ == "__main__":
    main()
