"""Run-wide settings handed to every workload."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
# Big input files (the 1 GiB random image) are kept between runs, outside the
# repository; QMPJOBD_BENCH_CACHE moves them (it should be a disk, not tmpfs, for
# the data workload to be realistic).
CACHE_DIR = Path(os.environ.get("QMPJOBD_BENCH_CACHE",
                                os.path.join(tempfile.gettempdir(), "qmpjobd-bench")))


@dataclass
class Config:
    quick: bool = False
    verbose: bool = False
    cache_dir: Path = CACHE_DIR

    def pick(self, full: T, quick: T) -> T:
        """The size of a workload in this mode."""
        return quick if self.quick else full
