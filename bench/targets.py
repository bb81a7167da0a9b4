"""The workloads and the targets qmpjobd must meet, as data.

A row of the result table is one (workload, metric). A target is either a ratio
qmpjobd/QEMU of the medians from the same run, or an absolute bound on qmpjobd's
own median. Metrics without a target are printed for information.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.config import Config
from bench.workloads import data, embedding, fairness, jobs, nbd, protocol, qcow2

WorkloadFn = Callable[[str, Config], dict[str, float]]


@dataclass(frozen=True)
class Workload:
    name: str
    run: WorkloadFn
    reps: int          # default repetitions per daemon
    quick_reps: int
    what: str


WORKLOADS: list[Workload] = [
    Workload("startup", protocol.startup, 10, 3, "process start to greeting received"),
    Workload("embedded", embedding.embedded, 5, 2,
             "a test's daemon: qmpjobd embedded in the loop vs qsd spawned, to negotiated"),
    Workload("latency", protocol.latency, 5, 2, "sequential query-jobs on one connection"),
    Workload("pipelined", protocol.pipelined, 5, 2, "one connection, requests sent without waiting"),
    Workload("many_clients", protocol.many_clients, 5, 2, "16 monitors, each pipelining query-jobs"),
    Workload("fairness", fairness.fairness, 5, 2, "one client bursts query-qmp-schema, another's round trips"),
    Workload("churn", jobs.churn, 3, 1, "manual backup jobs: start, PENDING, finalize, dismiss"),
    Workload("fanout", jobs.fanout, 3, 1, "64 monitors receive every event of the jobs"),
    Workload("data", data.data, 3, 1, "backup and mirror of a random raw image, bit-exact"),
    Workload("nbd", nbd.nbd, 3, 1, "nbdcopy: read a raw and a qcow2 export to null:, write a raw export"),
    Workload("qcow2_backup", qcow2.backup, 3, 1, "backup raw -> new qcow2 (blockdev-create), 1 GiB"),
    Workload("qcow2_mirror", qcow2.mirror, 3, 1, "mirror qcow2 -> new qcow2, sync full, 1 GiB"),
    Workload("qcow2_commit", qcow2.commit, 3, 1, "active block-commit of a half-full overlay, 1 GiB"),
    Workload("qcow2_stream", qcow2.stream, 3, 1, "block-stream of a two-image chain, 1 GiB"),
    # One repetition: qsd needs ~45 s to start 1000 jobs (each backup start drains
    # every node, so it is quadratic); the metrics are medians of many samples.
    Workload("scale", jobs.scale, 1, 1, "rate-limited backups all RUNNING"),
    Workload("memory", jobs.memory, 1, 1, "concluded jobs kept; a client that never reads"),
]


@dataclass(frozen=True)
class Target:
    workload: str
    metric: str
    label: str
    unit: str
    better: str              # "lower" or "higher": how to read the numbers
    ratio_max: float | None = None   # qmpjobd/QEMU must be <= this
    ratio_min: float | None = None   # qmpjobd/QEMU must be >= this
    abs_max: float | None = None     # qmpjobd's median must be < this
    must_be: float | None = None     # qmpjobd's worst repetition must equal this

    def describe(self) -> str:
        if self.ratio_max is not None:
            return f"<= {self.ratio_max:g}x"
        if self.ratio_min is not None:
            return f">= {self.ratio_min:g}x"
        if self.abs_max is not None:
            return f"< {self.abs_max:g} {self.unit}"
        if self.must_be is not None:
            return "all reps" if self.must_be == 1 else f"== {self.must_be:g}"
        return ""

    def check(self, ours: dict[str, float], theirs: dict[str, float] | None) -> bool | None:
        """PASS/FAIL from summaries (median/min/max); None when there is no target."""
        if self.ratio_max is not None or self.ratio_min is not None:
            if theirs is None or not theirs["median"]:
                return None
            ratio = ours["median"] / theirs["median"]
            return ratio <= self.ratio_max if self.ratio_max is not None else ratio >= self.ratio_min
        if self.abs_max is not None:
            return ours["median"] < self.abs_max
        if self.must_be is not None:
            return ours["min"] == self.must_be and ours["max"] == self.must_be
        return None


def T(workload: str, metric: str, label: str, unit: str, better: str = "lower", **bound: float) -> Target:
    return Target(workload, metric, label, unit, better, **bound)


# Every row printed, in order; rows without a bound are information only.
ROWS: list[Target] = [
    T("startup", "startup_ms", "start-up to greeting (.pyc cached)", "ms", ratio_max=1.5),
    T("startup", "startup_nocache_ms", "start-up, PYTHONDONTWRITEBYTECODE=1", "ms"),
    T("embedded", "to_greeting_ms", "test daemon: start to greeting", "ms", ratio_max=0.5),
    T("embedded", "to_negotiated_ms", "test daemon: start to qmp_capabilities", "ms", ratio_max=0.5),
    T("embedded", "embedded_first_ms", "embedded, first start of a rep (max: + imports)", "ms"),
    T("latency", "p50_us", "query-jobs round trip p50", "us", ratio_max=0.5),
    T("latency", "p99_us", "query-jobs round trip p99", "us", ratio_max=1.0),
    T("pipelined", "cmds_per_s", "pipelined throughput", "cmd/s", "higher", ratio_min=4.0),
    T("many_clients", "cmds_per_s", "16 clients aggregate", "cmd/s", "higher", ratio_min=8.0),
    T("fairness", "other_max_ms", "other client's worst round trip, burst", "ms", ratio_max=2.0),
    T("fairness", "other_p50_ms", "other client's round trip p50, burst", "ms"),
    T("fairness", "burst_wall_ms", "260 query-qmp-schema in one write", "ms"),
    T("fairness", "burst_complete", "burst answered in full", "bool", "higher", must_be=1.0),
    T("churn", "wall_s", "1000 manual jobs, wall", "s", ratio_max=0.5),
    T("fanout", "wall_ms", "64 clients x 200 jobs' events", "ms", ratio_max=1.0),
    T("fanout", "events_per_client", "events each client got", "events", "higher"),
    T("data", "backup_wall_s", "backup 1 GiB, wall", "s", ratio_max=1.0),
    T("data", "backup_cpu_s", "backup 1 GiB, daemon CPU", "s"),
    T("data", "backup_bit_exact", "backup target bit-exact", "bool", "higher", must_be=1.0),
    T("data", "mirror_wall_s", "mirror 1 GiB, wall", "s", ratio_max=1.0),
    T("data", "mirror_cpu_s", "mirror 1 GiB, daemon CPU", "s"),
    T("data", "mirror_bit_exact", "mirror target bit-exact", "bool", "higher", must_be=1.0),
    T("qcow2_backup", "backup_wall_s", "qcow2 backup raw->qcow2 1 GiB, wall", "s", ratio_max=1.0),
    T("qcow2_backup", "backup_cpu_s", "qcow2 backup raw->qcow2 1 GiB, daemon CPU", "s"),
    T("qcow2_backup", "backup_exact", "qcow2 backup raw->qcow2 1 GiB: qemu-img compare+check", "bool", "higher", must_be=1.0),
    T("qcow2_mirror", "mirror_wall_s", "qcow2 mirror qcow2->qcow2 1 GiB, wall", "s", ratio_max=1.0),
    T("qcow2_mirror", "mirror_cpu_s", "qcow2 mirror qcow2->qcow2 1 GiB, daemon CPU", "s"),
    T("qcow2_mirror", "mirror_exact", "qcow2 mirror qcow2->qcow2 1 GiB: qemu-img compare+check", "bool", "higher", must_be=1.0),
    T("qcow2_commit", "commit_wall_s", "qcow2 active commit 1 GiB, wall", "s", ratio_max=1.0),
    T("qcow2_commit", "commit_cpu_s", "qcow2 active commit 1 GiB, daemon CPU", "s"),
    T("qcow2_commit", "commit_exact", "qcow2 active commit 1 GiB: qemu-img compare+check", "bool", "higher", must_be=1.0),
    T("qcow2_stream", "stream_wall_s", "qcow2 stream 1 GiB, wall", "s", ratio_max=1.0),
    T("qcow2_stream", "stream_cpu_s", "qcow2 stream 1 GiB, daemon CPU", "s"),
    T("qcow2_stream", "stream_exact", "qcow2 stream 1 GiB: qemu-img compare+check", "bool", "higher", must_be=1.0),
    T("nbd", "read_raw_wall_s", "nbdcopy raw export -> null:, 1 GiB", "s", ratio_max=1.0),
    T("nbd", "read_raw_cpu_s", "nbdcopy raw read, daemon CPU", "s"),
    T("nbd", "read_raw_exact", "raw export reads the image", "bool", "higher", must_be=1.0),
    T("nbd", "read_qcow2_wall_s", "nbdcopy qcow2 export -> null:, 1 GiB", "s", ratio_max=1.0),
    T("nbd", "read_qcow2_cpu_s", "nbdcopy qcow2 read, daemon CPU", "s"),
    T("nbd", "read_qcow2_exact", "qcow2 export reads the image", "bool", "higher", must_be=1.0),
    T("nbd", "write_raw_wall_s", "nbdcopy raw file -> writable export, 1 GiB", "s", ratio_max=1.0),
    T("nbd", "write_raw_cpu_s", "nbdcopy write, daemon CPU", "s"),
    T("nbd", "write_raw_exact", "written export equals the source", "bool", "higher", must_be=1.0),
    T("scale", "query_p50_ms", "query-jobs p50, 1000 running", "ms", abs_max=10.0),
    T("scale", "idle_cpu_pct", "idle CPU, 1000 running", "% core", abs_max=5.0),
    T("scale", "rss_mib", "RSS, 1000 running (16 GiB nodes)", "MiB"),
    T("memory", "concluded_hwm_mib", "peak RSS, 10000 concluded", "MiB", abs_max=50.0),
    T("memory", "concluded_growth_mib", "RSS growth, 10000 concluded", "MiB"),
    T("memory", "slow_reader_growth_1000_mib", "RSS growth, reader stalled, 1000 ev", "MiB"),
    T("memory", "slow_reader_growth_20000_mib", "RSS growth, reader stalled, 20000 ev", "MiB"),
    T("memory", "slow_reader_cut_off", "stalled reader disconnected", "bool"),
    T("memory", "slow_reader_probe_ms", "other client query-jobs p50 after", "ms"),
]


def by_name(names: list[str]) -> list[Workload]:
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]
