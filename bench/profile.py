"""``python -m bench.profile WORKLOAD``: where qmpjobd's time goes in one workload.

Runs the workload once against qmpjobd with py-spy attached to every daemon the
workload starts (py-spy samples from outside, so the daemon runs unmodified), then
prints the functions with the most samples: *self* (the function itself was on
top of the stack) and *inclusive* (it was anywhere on the stack). The collapsed
stacks are kept in bench/results/profile-WORKLOAD-*.txt for flame graphs.

py-spy is not a project dependency: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import procs
from bench.config import Config
from bench.report import RESULTS_DIR
from bench.targets import by_name


def py_spy() -> str:
    path = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(path).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return path


class Recorder:
    """Attaches py-spy to each daemon started while it is installed."""

    def __init__(self, name: str, rate: int) -> None:
        self.name, self.rate = name, rate
        self.outputs: list[Path] = []
        self.children: list[subprocess.Popen] = []

    def attach(self, pid: int) -> None:
        out = RESULTS_DIR / f"profile-{self.name}-{len(self.outputs)}.txt"
        self.outputs.append(out)
        self.children.append(subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(out), "--nolineno"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)  # py-spy needs a moment to attach before the workload starts

    def finish(self) -> None:
        # py-spy writes its file when the target exits (the workload stops it).
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.terminate()


def load_stacks(paths: list[Path]) -> list[tuple[list[str], int]]:
    """Collapsed stacks: 'frame;frame;frame count' per line, root first."""
    stacks = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            frames, _, count = line.rpartition(" ")
            if frames:
                stacks.append((frames.split(";"), int(count)))
    return stacks


def top(stacks: list[tuple[list[str], int]], limit: int) -> str:
    total = sum(count for _, count in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "self %   function"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in own.most_common(limit)]
    lines += ["", "incl %   function"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in inclusive.most_common(limit)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=int, default=500, help="samples per second")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    (workload,) = by_name([args.workload])
    RESULTS_DIR.mkdir(exist_ok=True)
    recorder = Recorder(args.workload, args.rate)
    procs.ON_START.append(recorder.attach)
    try:
        print(workload.run("qmpjobd", Config(quick=args.quick)), file=sys.stderr)
    finally:
        procs.ON_START.remove(recorder.attach)
        recorder.finish()
    print(top(load_stacks(recorder.outputs), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
