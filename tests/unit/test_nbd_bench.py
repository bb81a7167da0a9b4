"""The NBD benchmark workload runs end to end on both daemons at its quick size
(64 MiB): numbers come out and every copy is exact (no timing bar)."""

from __future__ import annotations

import math

from bench.cli import run_workload
from bench.config import Config
from bench.procs import KINDS
from bench.targets import by_name


def test_nbd_workload_copies_exactly(tmp_path) -> None:
    (workload,) = by_name(["nbd"])
    entries = run_workload(workload, list(KINDS), reps=1, cfg=Config(quick=True, cache_dir=tmp_path))
    for kind in KINDS:
        assert entries[kind]["error"] is None, f"{kind}: {entries[kind]['error']}"
        (metrics,) = entries[kind]["reps"]
        for name in ("read_raw", "read_qcow2", "write_raw"):
            assert metrics[f"{name}_exact"] == 1.0, (kind, metrics)
            assert math.isfinite(metrics[f"{name}_wall_s"]) and metrics[f"{name}_wall_s"] > 0
