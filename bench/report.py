"""Turning per-repetition numbers into the result table: text, Markdown, JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from bench.procs import qsd_version
from bench.stats import summarize
from bench.targets import ROWS, Target

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# results[workload][kind] = {"reps": [ {metric: value}, ... ], "error": str | None}
Results = dict[str, dict[str, dict]]


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qsd": qsd_version(),
        "qmpjobd_commit": _git("rev-parse", "--short", "HEAD"),
        "qmpjobd_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str:
    # Read-only queries; the benchmark never changes the repository.
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def rows(results: Results) -> list[dict]:
    """One dict per table row, with summaries, ratio and verdict."""
    out = []
    for target in ROWS:
        if target.workload not in results:
            continue
        per_kind = results[target.workload]
        row: dict = {"workload": target.workload, "metric": target.metric, "label": target.label,
                     "unit": target.unit, "target": target.describe()}
        for kind in ("qmpjobd", "qsd"):
            row[kind] = _summary(per_kind.get(kind, {}), target.metric)
        row["ratio"] = _ratio(row["qmpjobd"], row["qsd"])
        row["verdict"] = _verdict(target, row["qmpjobd"], row["qsd"])
        out.append(row)
    return out


def _summary(entry: dict, metric: str) -> dict | None:
    values = [rep[metric] for rep in entry.get("reps", []) if metric in rep]
    if not values:
        # "not run": daemon left out, or the metric is not measured in this mode.
        return {"error": entry.get("error")} if entry.get("error") else {"missing": True}
    summary = summarize(values)
    if entry.get("error"):
        summary["error"] = entry["error"]
    return summary


def _ratio(ours: dict, theirs: dict) -> float | None:
    if "median" not in ours or "median" not in theirs or not theirs["median"]:
        return None
    return ours["median"] / theirs["median"]


def _verdict(target: Target, ours: dict, theirs: dict) -> str:
    if "median" not in ours:
        return "ERR" if target.describe() and not ours.get("missing") else "-"
    verdict = target.check(ours, theirs if "median" in theirs else None)
    return {True: "PASS", False: "FAIL", None: "-"}[verdict]


# -- text --------------------------------------------------------------------


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def cell(summary: dict) -> str:
    if "median" not in summary:
        return "not run" if summary.get("missing") else "ERR"
    if summary["n"] == 1 or summary["min"] == summary["max"]:
        return fmt(summary["median"])
    return f"{fmt(summary['median'])} [{fmt(summary['min'])}-{fmt(summary['max'])}]"


HEADER = ("metric", "unit", "qmpjobd median [min-max]", "QEMU qsd median [min-max]", "ratio", "target", "verdict")


def table_cells(table: list[dict]) -> list[tuple[str, ...]]:
    return [(r["label"], r["unit"], cell(r["qmpjobd"]), cell(r["qsd"]),
             "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["target"] or "-", r["verdict"])
            for r in table]


def text_table(table: list[dict]) -> str:
    lines = [HEADER, *table_cells(table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(table: list[dict]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(line) + " |" for line in table_cells(table)]
    return "\n".join(out)


def errors(results: Results) -> list[str]:
    return [f"{w}/{k}: {e['error']}" for w, kinds in results.items() for k, e in kinds.items() if e.get("error")]


# -- files -------------------------------------------------------------------


def save(results: Results, meta: dict) -> Path:
    """Write latest.json/.md and a timestamped copy; return the timestamped path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    table = rows(results)
    doc = {**meta, "rows": table, "raw": results}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(meta["started"]))
    text = json.dumps(doc, indent=1, default=str)
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    (RESULTS_DIR / "latest.md").write_text(markdown_table(table) + "\n")
    return path

