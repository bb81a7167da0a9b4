"""Play scenarios repeatedly against one daemon, under CPU load, and report drift.

A scenario can only be a conformance test if the oracle itself always produces the
same transcript for it. Timing-dependent orderings (a reply racing thread-pool I/O)
often hold on an idle machine and break on a loaded CI runner; this tool finds them
before CI does:

    .venv/bin/python -m tests.conformance.stability --runs 5 --load 2 \\
        tests/conformance/scenarios/*.qmp

``--load N`` keeps N busy-looping processes running while the scenarios play.
``--kind qmpjobd`` checks qmpjobd's own stability the same way; ``--qemu-version V``
plays qemu-storage-daemon of QEMU V (default 7.2), or qmpjobd with that option.

Load alone rarely moves QEMU's thread pool; ``--io-races`` finds those spots
directly: it plays each scenario on qmpjobd once normally and once with file I/O
that completes instantly (``instant_io/sitecustomize.py``) and prints where the
transcripts differ. Every difference is an ordering a fast or slow disk can flip on
QEMU. Exit status 1 when any scenario produced more than one distinct transcript.
"""

from __future__ import annotations

import argparse
import difflib
import multiprocessing
import os
import sys
from pathlib import Path

from tests.conformance.runner import Player, Scenario
from tests.support.oracles import SUPPORTED_VERSIONS


def _spin() -> None:
    while True:
        pass


def distinct_transcripts(path: Path, kind: str, runs: int,
                         version: str | None = None) -> list[list[str]]:
    scenario = Scenario.load(path)
    seen: list[list[str]] = []
    for _ in range(runs):
        transcript = Player(scenario, kind, version).play()
        if transcript not in seen:
            seen.append(transcript)
    return seen


INSTANT_IO = Path(__file__).with_name("instant_io")


def io_race_variants(path: Path) -> list[list[str]]:
    scenario = Scenario.load(path)
    normal = Player(scenario, "qmpjobd").play()
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(INSTANT_IO) + (os.pathsep + saved if saved else "")
    try:
        instant = Player(scenario, "qmpjobd").play()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return [normal] if instant == normal else [normal, instant]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+", type=Path)
    parser.add_argument("--kind", choices=("qsd", "qmpjobd"), default="qsd")
    parser.add_argument("--qemu-version", choices=SUPPORTED_VERSIONS, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load", type=int, default=0, help="busy processes while playing")
    parser.add_argument("--io-races", action="store_true",
                        help="compare qmpjobd with instant file I/O against a normal run")
    args = parser.parse_args(argv)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    unstable = 0
    try:
        for path in args.scenarios:
            if args.io_races:
                variants = io_race_variants(path)
                runs = "normal and instant file I/O"
            else:
                variants = distinct_transcripts(path, args.kind, args.runs, args.qemu_version)
                runs = f"{args.runs} runs"
            print(f"{'stable' if len(variants) == 1 else 'UNSTABLE'} {path.name}"
                  f" ({len(variants)} variant(s) in {runs})", flush=True)
            if len(variants) > 1:
                unstable += 1
                for other in variants[1:]:
                    print("\n".join(difflib.unified_diff(variants[0], other, lineterm="")))
    finally:
        for spinner in spinners:
            spinner.terminate()
    return 1 if unstable else 0


if __name__ == "__main__":
    sys.exit(main())
