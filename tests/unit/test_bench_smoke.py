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
