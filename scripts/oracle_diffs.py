#!/usr/bin/env python3
"""Play every conformance scenario on each real qemu-storage-daemon and compare
each version's transcript with 7.2's.

A measurement for the personalities work, not a test: it says which scenarios a
qmpjobd personality has to change, and how. ``major``/``minor`` are masked (they
differ by definition); everything else is compared as the conformance suite
compares. Each version plays every scenario ``--runs`` times; a scenario whose
runs disagree on one version is reported as unstable rather than as a difference.

    .venv/bin/python scripts/oracle_diffs.py --output /work/notes/oracle-diffs.md
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conformance.runner import Player, Scenario, scenario_paths  # noqa: E402
from tests.support.oracles import SUPPORTED_VERSIONS, oracle_version  # noqa: E402

BASELINE = SUPPORTED_VERSIONS[0]
SAMPLE_LINES = 6
LINE_WIDTH = 220


@dataclass
class Played:
    transcripts: list[list[str]]
    stderr: str
    error: str = ""

    @property
    def stable(self) -> bool:
        return all(t == self.transcripts[0] for t in self.transcripts)


def play(path: Path, version: str, runs: int) -> Played:
    scenario = Scenario.load(path)
    transcripts, stderr = [], ""
    for _ in range(runs):
        player = Player(scenario, "qsd", version, mask_series=True)
        try:
            transcripts.append(player.play())
        except Exception as exc:  # a scenario that breaks on a version is a finding too
            return Played(transcripts, player.stderr, f"{type(exc).__name__}: {exc}")
        stderr = player.stderr
    return Played(transcripts, stderr)


def changed_lines(old: list[str], new: list[str]) -> list[str]:
    diff = difflib.unified_diff(old, new, lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def shorten(line: str) -> str:
    line = line.replace('{"timestamp": {"seconds": S, "microseconds": U}, ', "{")
    return line if len(line) <= LINE_WIDTH else line[:LINE_WIDTH] + " …"


TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\s+|[^\s"]+')


def edits(old: str, new: str) -> str:
    """What changed inside one line, as ``{-removed+added}`` with a little context:
    long replies usually differ by one member, which a cut-off line would hide."""
    a, b = TOKEN.findall(old[1:]), TOKEN.findall(new[1:])
    pieces = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        context = "".join(a[max(0, i1 - 4):i1])
        pieces.append(f"…{context}{{-{''.join(a[i1:i2])}+{''.join(b[j1:j2])}}}")
    where = old[1:old.index("<-") + 3] if "<-" in old[:8] else " "
    return "~" + where + " ".join(pieces)


def summarise(lines: list[str]) -> list[str]:
    """Pair each removed line with the added line at the same place in its hunk."""
    removed = [line for line in lines if line.startswith("-")]
    added = [line for line in lines if line.startswith("+")]
    if len(removed) != len(added):
        return [shorten(line) for line in lines]
    summary = []
    for old, new in zip(removed, added):
        changed = edits(old, new)
        # A line that only moved pairs with a different one: an edit says nothing.
        summary += [shorten(changed)] if "{-" in changed and len(changed) < 2 * LINE_WIDTH \
            else [shorten(old), shorten(new)]
    return summary


def stderr_sample(lines: list[str]) -> list[str]:
    """The first changed stderr line as an edit, and how many lines each side has."""
    removed = [line for line in lines if line.startswith("-")]
    added = [line for line in lines if line.startswith("+")]
    sample = [f"stderr: {len(removed)} line(s) only in {BASELINE}, {len(added)} only in the other"]
    if removed and added:
        sample.append("stderr " + shorten(edits(removed[0], added[0])))
    else:
        sample += ["stderr " + shorten(line) for line in (removed or added)[:1]]
    return sample


SHOWN_STDERR: set[tuple[str, ...]] = set()


def describe(base: Played, other: Played) -> tuple[str, list[str]]:
    """A verdict on the transcripts (stderr is reported apart) and sample lines."""
    if other.error:
        return "**fails**", [other.error]
    if not other.stable:
        return "unstable", run_variants(other)
    lines = changed_lines(base.transcripts[0], other.transcripts[0])
    err = changed_lines(base.stderr.splitlines(), other.stderr.splitlines())
    verdict = "same"
    if lines:
        added = sum(1 for line in lines if line.startswith("+"))
        verdict = f"**differs** ({len(lines) - added} lines out, {added} in)"
    if err:
        verdict += ", stderr differs"
    sample = summarise(lines)[:SAMPLE_LINES]
    if err:
        shown = tuple(stderr_sample(err)[1:])
        if shown not in SHOWN_STDERR:  # the same warning text recurs in most job scenarios
            SHOWN_STDERR.add(shown)
            sample += stderr_sample(err)
    return verdict, sample


def run_variants(played: Played) -> list[str]:
    """How the runs of one version disagreed with its first run."""
    lines = []
    for other in played.transcripts[1:]:
        lines += summarise(changed_lines(played.transcripts[0], other))[:SAMPLE_LINES]
    return ["(run 1 vs later runs of the same version)", *lines]


def report(results: dict[tuple[str, str], Played], names: list[str], runs: int,
           seconds: float) -> str:
    versions = ", ".join(f"{v} = {oracle_version(v)}" for v in SUPPORTED_VERSIONS)
    out = [f"# Conformance scenarios on qemu-storage-daemon {', '.join(SUPPORTED_VERSIONS[1:])} "
           f"vs {BASELINE}", "",
           f"Oracles: {versions}. Each scenario played {runs} time(s) per version with "
           f"`scripts/oracle_diffs.py` ({seconds:.0f} s); transcripts normalised as in the "
           "conformance suite, plus `major`/`minor` masked. Lines starting `-` are 7.2's, "
           "`+` the other version's; `~` lines show the changes inside one line "
           "as `{-old+new}`.", ""]
    out += ["| scenario | " + " | ".join(SUPPORTED_VERSIONS[1:]) + " |",
            "|---|" + "---|" * (len(SUPPORTED_VERSIONS) - 1)]
    details = []
    counts = dict.fromkeys(SUPPORTED_VERSIONS[1:], 0)
    for name in names:
        base = results[(name, BASELINE)]
        cells = []
        for version in SUPPORTED_VERSIONS[1:]:
            if base.stable:
                verdict, sample = describe(base, results[(name, version)])
            else:
                verdict, sample = f"{BASELINE} unstable", run_variants(base)
            counts[version] += "**differs**" in verdict
            cells.append(verdict)
            if sample and (base.stable or version == SUPPORTED_VERSIONS[1]):
                title = name if not base.stable else f"{name} on {version}"
                details += [f"### {title}", "", "```", *sample, "```", ""]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "Totals (transcripts): " + "; ".join(f"{v} differs from {BASELINE} in {n} of {len(names)}"
                                       for v, n in counts.items()) + ".", "",
            "## Representative lines", "", *details]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("scenarios", nargs="*", type=Path)
    args = parser.parse_args()
    paths = args.scenarios or scenario_paths()
    started = time.monotonic()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {(p.stem, v): pool.submit(play, p, v, args.runs)
                   for p in paths for v in SUPPORTED_VERSIONS}
        results = {key: future.result() for key, future in futures.items()}
    text = report(results, [p.stem for p in paths], args.runs, time.monotonic() - started)
    args.output.write_text(text + "\n")
    print(text.split("## Representative lines")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
