"""The real qemu-storage-daemon and qemu-img of each QEMU version, for the tests.

Where they come from (the host's package or a Debian root in the oracle cache)
is decided by scripts/oracle_roots.py, which `make oracle` runs to install them;
this module only finds them. A missing oracle raises RuntimeError, so the test
that needs it fails: it never skips.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from qmpjobd.versions import KNOWN_VERSIONS

REPO = Path(__file__).resolve().parents[2]

SUPPORTED_VERSIONS = KNOWN_VERSIONS
DEFAULT_VERSION = "7.2"
# The versions the conformance suite plays every scenario against: all of them.
CONFORMANCE_VERSIONS: tuple[str, ...] = SUPPORTED_VERSIONS


@functools.cache
def oracle_roots() -> ModuleType:
    """scripts/oracle_roots.py, loaded by path (scripts/ is not a package)."""
    path = REPO / "scripts" / "oracle_roots.py"
    spec = importlib.util.spec_from_file_location("qmpjobd_oracle_roots", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _command(version: str, program: str) -> list[str]:
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unknown QEMU version {version!r}; supported: {', '.join(SUPPORTED_VERSIONS)}")
    try:
        return list(oracle_roots().oracle_command(version, program))
    except oracle_roots().OracleMissing as missing:
        raise RuntimeError(str(missing)) from None


def oracle_command(version: str = DEFAULT_VERSION) -> list[str]:
    """The argv prefix that runs qemu-storage-daemon of QEMU ``version``."""
    return _command(version, "qemu-storage-daemon")


def qemu_img_command(version: str = DEFAULT_VERSION) -> list[str]:
    """The argv prefix that runs qemu-img of QEMU ``version``."""
    return _command(version, "qemu-img")


@functools.cache
def oracle_version(version: str = DEFAULT_VERSION) -> str:
    """The exact x.y.z of that version's qemu-storage-daemon (its micro moves with
    Debian's stable updates; only major.minor is pinned)."""
    exact = oracle_roots().probe_version(oracle_command(version))
    if oracle_roots().series_of(exact) != version:
        raise RuntimeError(f"the {version} oracle ({' '.join(oracle_command(version))}) "
                           f"reports version '{exact or 'nothing'}'")
    return exact
