#!/usr/bin/env python3
"""The real qemu-storage-daemon of every QEMU version qmpjobd imitates.

7.2, 10.0 and 11.1 are the versions of Debian 12, Debian 13 and Debian 13
backports. The host's own package serves the version it has (Debian 12: 7.2).
Every other version lives in a minimal Debian root built with debootstrap from
the Debian archive the host's apt already uses, in a cache directory outside
the clone (``$QMPJOBD_ORACLE_CACHE``, default /var/cache/qmpjobd/oracles), one
directory per version.

The daemons run without chroot, through the root's own dynamic loader, so the
socket and image paths a test passes are the host's paths.

A root is built in a temporary directory next to its final place and renamed
into place only once it is complete and verified, so an interrupted build never
leaves something that looks usable. Only the standard library is used: this
runs before the project's virtualenv exists, and the tests import it to find
the daemons.

    python3 scripts/oracle_roots.py ensure [--refresh]   build what is missing
    python3 scripts/oracle_roots.py show                 print each oracle's argv and version
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "/var/cache/qmpjobd/oracles"
CACHE_ENV = "QMPJOBD_ORACLE_CACHE"
MIRROR_ENV = "QMPJOBD_DEBIAN_MIRROR"
PACKAGES = ("qemu-system-common", "qemu-utils")
MARKER = ".qmpjobd-oracle.json"
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
LOADER = "lib64/ld-linux-x86-64.so.2"
VERSION_LINE = re.compile(r"version (\d+)\.(\d+)\.(\d+)")
# Paths dpkg leaves out of the roots: nobody reads documentation in a test fixture.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*",
                 "/usr/share/locale/*", "/usr/share/lintian/*")
TRIM_AFTER_BUILD = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                    "var/cache/apt", "var/lib/apt/lists")


@dataclass(frozen=True)
class OracleSpec:
    """Where one QEMU version comes from in Debian."""

    series: str  # "major.minor"
    suite: str
    backports: bool = False

    @property
    def install_suite(self) -> str:
        return f"{self.suite}-backports" if self.backports else self.suite


SPECS = {
    "7.2": OracleSpec("7.2", "bookworm"),
    "10.0": OracleSpec("10.0", "trixie"),
    "11.1": OracleSpec("11.1", "trixie", backports=True),
}


class OracleMissing(RuntimeError):
    """An oracle is not installed; tests report it as a failure, never a skip."""


# ---------------------------------------------------------------------------
# Finding the daemons (used by the tests too)

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def root_dir(series: str) -> Path:
    return cache_dir() / series


def loader_command(root: Path, program: str) -> list[str]:
    """Run ROOT/usr/bin/PROGRAM with ROOT's own loader and libraries, no chroot."""
    library_path = ":".join(str(root / d) for d in LIBRARY_DIRS)
    return [str(root / LOADER), "--library-path", library_path, str(root / "usr/bin" / program)]


def parse_version(text: str) -> tuple[int, int, int] | None:
    match = VERSION_LINE.search(text)
    return tuple(int(n) for n in match.groups()) if match else None  # type: ignore[return-value]


def probe_version(argv: list[str]) -> str:
    """The exact x.y.z that ``argv --version`` prints, or '' when it does not run."""
    try:
        done = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = parse_version(done.stdout) if done.returncode == 0 else None
    return ".".join(map(str, found)) if found else ""


def series_of(version: str) -> str:
    return ".".join(version.split(".")[:2])


@functools.lru_cache(maxsize=None)
def host_version(program: str) -> tuple[str, str]:
    """(path, exact version) of the host's own ``program``; ('', '') when absent."""
    path = shutil.which(program)
    return (path, probe_version([path])) if path else ("", "")


def host_command(program: str, series: str) -> list[str] | None:
    """The host's own binary, when it is installed and of the wanted series."""
    path, version = host_version(program)
    return [path] if path and series_of(version) == series else None


def root_is_complete(series: str) -> bool:
    # The marker is written last, inside the temporary directory, before the
    # rename: a root under its final name with its marker is a finished build.
    return (root_dir(series) / MARKER).is_file()


def oracle_command(series: str, program: str = "qemu-storage-daemon") -> list[str]:
    """The argv prefix that runs ``program`` of QEMU ``series``."""
    if series not in SPECS:
        raise ValueError(f"unknown QEMU version {series!r}; known: {', '.join(SPECS)}")
    host = host_command(program, series)
    if host:
        return host
    if root_is_complete(series):
        return loader_command(root_dir(series), program)
    raise OracleMissing(
        f"{program} {series} is not installed: neither the host's package has that version "
        f"nor is there a complete root in {root_dir(series)}; run `make oracle` as root "
        f"(scripts/ensure-oracle.sh)")


# ---------------------------------------------------------------------------
# Building the roots

def log(message: str) -> None:
    print(f"ensure-oracle: {message}", file=sys.stderr, flush=True)


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    return ""


def deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current = [], {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
            continue
        if line[0].isspace():
            continue  # continuation lines carry nothing we need (e.g. inline keys)
        key, _, value = line.partition(":")
        current[key.strip().lower()] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def apt_sources(apt: Path = Path("/etc/apt")) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled binary source the host's apt knows."""
    sources: list[tuple[str, list[str]]] = []
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in deb822_stanzas(path.read_text()):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled") == "no":
                continue
            for uri in stanza.get("uris", "").split():
                sources.append((uri, stanza.get("suites", "").split()))
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                sources.append((words[1], [words[2]]))
    return sources


def debian_mirror(apt: Path = Path("/etc/apt"), os_release: Path = Path("/etc/os-release")) -> str:
    """The host's main Debian archive: the source that serves the host's own release."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    codename = host_codename(os_release)
    for uri, suites in apt_sources(apt):
        if codename in suites:
            return uri.rstrip("/")
    raise SystemExit(f"ensure-oracle: no apt source serves '{codename}'; set {MIRROR_ENV}")


def run(argv: list[str], **kwargs: object) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise SystemExit(f"ensure-oracle: {' '.join(argv[:4])} ... failed:\n{tail}")


def chroot(root: Path, *argv: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C"}
    run(["chroot", str(root), *argv], env=env)


def remove_tree(path: Path) -> None:
    """Remove a (possibly half-built) root without ever crossing into a mount.

    debootstrap mounts /proc and /sys inside the target while it works; an
    interrupted run can leave them behind.
    """
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as table:
        mounts = [line.split()[4] for line in table]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def bootstrap(suite: str, target: Path, mirror: str) -> None:
    log(f"debootstrap {suite} from {mirror} (about half a minute)")
    run(["debootstrap", "--variant=minbase", suite, str(target), mirror])


def configure_root(root: Path, spec: OracleSpec, mirror: str) -> None:
    excludes = "".join(f"path-exclude={p}\n" for p in DPKG_EXCLUDES)
    (root / "etc/dpkg/dpkg.cfg.d/qmpjobd-nodoc").write_text(excludes)
    # Nothing installed into a fixture may start a service.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    suites = [spec.suite] + ([spec.install_suite] if spec.backports else [])
    (root / "etc/apt/sources.list").write_text("".join(f"deb {mirror} {s} main\n" for s in suites))
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")


def install_qemu(root: Path, spec: OracleSpec) -> None:
    log(f"installing {' '.join(PACKAGES)} from {spec.install_suite} into the {spec.series} root")
    chroot(root, "apt-get", "-q", "update")
    chroot(root, "apt-get", "install", "-y", "-q", "--no-install-recommends",
           "-t", spec.install_suite, *PACKAGES)
    for relative in TRIM_AFTER_BUILD:
        directory = root / relative
        if directory.is_dir():
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


def verify_root(root: Path, spec: OracleSpec) -> dict[str, str]:
    versions = {}
    for program in ("qemu-storage-daemon", "qemu-img"):
        version = probe_version(loader_command(root, program))
        if series_of(version) != spec.series:
            raise SystemExit(f"ensure-oracle: {program} in {root} reports '{version or 'nothing'}', "
                             f"expected {spec.series}.x")
        versions[program] = version
    return versions


def finish_root(build: Path, spec: OracleSpec, mirror: str) -> None:
    """Verify, mark and atomically move a built root to its final name."""
    versions = verify_root(build, spec)
    marker = {"series": spec.series, "suite": spec.install_suite, "mirror": mirror,
              "versions": versions, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (build / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    final = root_dir(spec.series)
    if final.exists():
        old = final.with_name(f".old-{spec.series}-{os.getpid()}")
        final.rename(old)
        build.rename(final)
        remove_tree(old)
    else:
        build.rename(final)
    log(f"{spec.series}: qemu-storage-daemon {versions['qemu-storage-daemon']} ready in {final}")


def root_is_healthy(series: str) -> bool:
    if not root_is_complete(series):
        return False
    return series_of(probe_version(loader_command(root_dir(series), "qemu-storage-daemon"))) == series


def wanted_roots(refresh: bool) -> list[OracleSpec]:
    """The versions the host cannot serve and whose root is missing or broken."""
    wanted = []
    for series, spec in SPECS.items():
        if host_command("qemu-storage-daemon", series) and host_command("qemu-img", series):
            continue
        if refresh or not root_is_healthy(series):
            wanted.append(spec)
    return wanted


def build_roots(specs: list[OracleSpec]) -> None:
    mirror = debian_mirror()
    cache = cache_dir()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        by_suite: dict[str, list[OracleSpec]] = {}
        for spec in specs:
            by_suite.setdefault(spec.suite, []).append(spec)
        for suite, group in by_suite.items():
            # One debootstrap per suite; every other version of it starts from a copy.
            base = work / suite
            bootstrap(suite, base, mirror)
            for index, spec in enumerate(group):
                build = work / f"root-{spec.series}"
                if index == len(group) - 1:
                    base.rename(build)
                else:
                    run(["cp", "-a", "--reflink=auto", str(base), str(build)])
                configure_root(build, spec, mirror)
                install_qemu(build, spec)
                finish_root(build, spec, mirror)
    finally:
        remove_tree(work)


def remove_leftovers() -> None:
    """Temporary directories of interrupted runs (we hold the lock: nobody else builds)."""
    for leftover in cache_dir().glob(".build-*"):
        log(f"removing {leftover.name}, left by an interrupted run")
        remove_tree(leftover)
    for leftover in cache_dir().glob(".old-*"):
        remove_tree(leftover)


def ensure(refresh: bool) -> int:
    if not refresh and not wanted_roots(False):
        return 0
    if os.geteuid() != 0:
        log("building the oracle roots needs root (debootstrap, chroot); run `make oracle` as root")
        return 1
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:
        # Parallel runs wait for each other; the second then finds the roots complete.
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_leftovers()
        specs = wanted_roots(refresh)
        if specs:
            started = time.monotonic()
            build_roots(specs)
            log(f"built {', '.join(s.series for s in specs)} in {time.monotonic() - started:.0f} s")
    return 0


def show() -> int:
    status = 0
    for series in SPECS:
        try:
            argv = oracle_command(series)
            print(f"{series}: {probe_version(argv) or 'does not run'}: {' '.join(argv)}")
        except OracleMissing as missing:
            print(f"{series}: missing: {missing}")
            status = 1
    return status


def exit_on_sigterm(signum: int, frame: object) -> None:
    # Turn a plain kill into an exception so the temporary build directory is
    # removed; a leftover one is removed by the next run anyway.
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    ensure_parser = sub.add_parser("ensure", help="build the roots that are missing or broken")
    ensure_parser.add_argument("--refresh", action="store_true",
                               help="rebuild every root (picks up new stable releases)")
    sub.add_parser("show", help="print each oracle's command and exact version")
    args = parser.parse_args()
    return ensure(args.refresh) if args.action == "ensure" else show()


if __name__ == "__main__":
    sys.exit(main())
