"""The benchmark suite runs end to end on both daemons (numbers only, no timing bar)."""

from __future__ import annotations

import math

import pytest

from bench.cli import run_workload
from bench.config import Config
from bench.procs import KINDS
from bench.targets import by_name


@pytest.mark.parametrize("name", ["startup", "latency", "embedded"])
def test_quick_workload_produces_numbers(name: str) -> None:
    (workload,) = by_name([name])
    entries = run_workload(workload, list(KINDS), reps=1, cfg=Config(quick=True))
    for kind in KINDS:
        assert entries[kind]["error"] is None, f"{kind}: {entries[kind]['error']}"
        (metrics,) = entries[kind]["reps"]
        assert metrics and all(math.isfinite(v) and v > 0 for v in metrics.values()), metrics


@pytest.mark.parametrize("name", ["qcow2_backup", "qcow2_mirror", "qcow2_commit", "qcow2_stream"])
def test_qcow2_workload_copies_exactly(name: str, tmp_path, monkeypatch) -> None:
    """Each qcow2 workload at 8 MiB on both daemons: numbers come out, and the
    written images pass qemu-img check and compare equal to the input."""
    from bench.workloads import qcow2

    monkeypatch.setenv(qcow2.SIZE_ENV, "8")
    (workload,) = by_name([name])
    entries = run_workload(workload, list(KINDS), reps=1, cfg=Config(quick=True, cache_dir=tmp_path))
    for kind in KINDS:
        assert entries[kind]["error"] is None, f"{kind}: {entries[kind]['error']}"
        (metrics,) = entries[kind]["reps"]
        prefix = name.removeprefix("qcow2_")
        assert metrics[f"{prefix}_exact"] == 1.0, (kind, metrics)
        assert math.isfinite(metrics[f"{prefix}_wall_s"]) and metrics[f"{prefix}_wall_s"] > 0
