"""Command line: run the workloads against qmpjobd and qemu-storage-daemon.

Repetitions of the two daemons are interleaved (qmpjobd, qsd, qsd, qmpjobd, ...)
so that drift in the machine's state (page cache, CPU frequency, other load) hits
both alike. Every workload starts fresh daemons; a failure of one daemon on one
workload is recorded and printed, and the run goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from bench import report
from bench.config import Config
from bench import procs
from bench.procs import KINDS
from qmpjobd.versions import DEFAULT_VERSION, KNOWN_VERSIONS
from bench.targets import WORKLOADS, Workload, by_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes (smoke run)")
    parser.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS))
    parser.add_argument("--reps", type=int, default=None, help="repetitions per daemon (default: per workload)")
    parser.add_argument("--daemons", default=",".join(KINDS), help="which daemons to run (default: both)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument("--qemu-version", choices=KNOWN_VERSIONS, default=DEFAULT_VERSION,
                        help="the personality: qmpjobd as QEMU V against qemu-storage-daemon V "
                        f"(default {DEFAULT_VERSION})")
    return parser.parse_args(argv)


def run_workload(workload: Workload, kinds: list[str], reps: int, cfg: Config) -> dict[str, dict]:
    """All repetitions of one workload on every daemon, interleaved."""
    entries: dict[str, dict] = {kind: {"reps": [], "error": None} for kind in kinds}
    for rep in range(reps):
        order = kinds if rep % 2 == 0 else list(reversed(kinds))
        for kind in order:
            entry = entries[kind]
            if entry["error"]:
                continue  # a daemon that failed once would only fail again, slowly
            started = time.perf_counter()
            try:
                entry["reps"].append(workload.run(kind, cfg))
            except Exception as exc:  # noqa: BLE001 - any failure is a result to report
                notes = " ".join(getattr(exc, "__notes__", []))
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} {notes}"[:400]
                print(f"  {workload.name}/{kind} rep {rep + 1}: FAILED {entry['error']}", file=sys.stderr)
                if cfg.verbose:
                    traceback.print_exc()
                continue
            print(f"  {workload.name}/{kind} rep {rep + 1}/{reps}: "
                  f"{_brief(entry['reps'][-1])} ({time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return entries


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={report.fmt(v)}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.QEMU_VERSION = args.qemu_version
    cfg = Config(quick=args.quick, verbose=args.verbose)
    procs.use_bytecode_cache(cfg.cache_dir / "pycache")
    workloads = by_name(args.only.split(",")) if args.only else WORKLOADS
    kinds = [k for k in args.daemons.split(",") if k]
    meta = {"started": time.time(), "quick": args.quick, "machine": report.machine(),
            "daemons": kinds, "qemu_version": args.qemu_version}
    print(f"machine: {meta['machine']}; personality: QEMU {args.qemu_version}", file=sys.stderr)
    results: report.Results = {}
    for workload in workloads:
        reps = args.reps or (workload.quick_reps if args.quick else workload.reps)
        print(f"{workload.name}: {workload.what} ({reps} reps)", file=sys.stderr)
        results[workload.name] = run_workload(workload, kinds, reps, cfg)
    meta["seconds"] = round(time.time() - meta["started"], 1)
    table = report.rows(results)
    print()
    if args.quick:
        print("quick mode: sizes reduced, labels give the full-mode sizes")
    print(report.text_table(table))
    if args.markdown:
        print()
        print(report.markdown_table(table))
    for line in report.errors(results):
        print(f"error: {line}")
    if not args.no_save:
        print(f"\nsaved {report.save(results, meta)} (and bench/results/latest.json)")
    return 0
