"""The QEMU versions qmpjobd can impersonate ("personalities"), as data.

A personality names one qemu-storage-daemon release (7.2, 10.0 or 11.1) and
decides everything that differs between them:

* the QAPI schema view: ``schema/*.json`` carries QEMU-style ``'if'``
  conditions, and a personality defines the condition symbols that are true
  for it (``Personality.schema_conditions``);
* the version it reports in the greeting and ``query-version``;
* behaviour differences of the other layers, which each layer keeps as a small
  table of ``Behaviour`` entries ("since 10.0 a transaction starts its jobs in
  reverse order") and asks with ``personality.has(BEHAVIOUR)``.

A caller asks "does this version have X", never "is this 10.0" (DESIGN.md,
decision 9): the release numbers appear in this module and in the tables,
not in handlers.

Schema condition symbols
------------------------

``QEMU_SINCE_<major>_<minor>``
    True for every personality at or after that QEMU release; one symbol per
    release in ``RELEASES``, so a condition reads like the "Since:" line of
    QEMU's documentation.  ``{'not': 'QEMU_SINCE_11_1'}`` marks something
    removed in 11.1.
``CONFIG_BLKIO``
    QEMU's own build symbol for the libblkio drivers (``io_uring``,
    ``virtio-blk-*``...).  Debian built 7.2 without libblkio and 10.0/11.1
    with it, so it is a property of the daemon we copy, not of the version.

The 10.0 personality is the daemon observed, 10.0.13: it includes what that
stable series backported (for example blkdebug's ``delay-ns``, 10.0.10).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qmpjobd import __version__

# Every QEMU feature release that a schema condition or behaviour table may
# name, oldest first.  Releases we do not impersonate are listed too, so that
# conditions can say when something really arrived.
RELEASES: tuple[str, ...] = (
    "7.2", "8.0", "8.1", "8.2", "9.0", "9.1", "9.2",
    "10.0", "10.1", "10.2", "11.0", "11.1",
)

KNOWN_VERSIONS: tuple[str, ...] = ("7.2", "10.0", "11.1")

# The personality of a daemon started without --qemu-version.
DEFAULT_VERSION = "11.1"

# Build configuration of the Debian daemons we copy (see the module docstring).
_BUILD_SYMBOLS: dict[str, frozenset[str]] = {
    "7.2": frozenset(),
    "10.0": frozenset({"CONFIG_BLKIO"}),
    "11.1": frozenset({"CONFIG_BLKIO"}),
}


class UnknownVersion(ValueError):
    """A version string that names no personality."""


def release_key(release: str) -> tuple[int, int]:
    """``"10.0"`` -> ``(10, 0)``: releases compare as numbers, not strings."""
    major, minor = release.split(".")
    return int(major), int(minor)


def since_symbol(release: str) -> str:
    """The schema condition symbol for "since *release*": ``QEMU_SINCE_10_0``."""
    if release not in RELEASES:
        raise ValueError(f"{release!r} is not in qmpjobd.versions.RELEASES")
    return "QEMU_SINCE_" + release.replace(".", "_")


ALL_SCHEMA_SYMBOLS: frozenset[str] = frozenset(
    {since_symbol(r) for r in RELEASES}.union(*_BUILD_SYMBOLS.values()))


@dataclass(frozen=True)
class Behaviour:
    """One behaviour difference of some layer: what it is and when QEMU
    started (and possibly stopped) doing it.  Layers keep these in a small
    table next to the code that honours them."""

    description: str
    since: str
    until: str | None = None        # first release that no longer does it

    def __post_init__(self) -> None:
        for release in (self.since, self.until):
            if release is not None and release not in RELEASES:
                raise ValueError(f"{release!r} is not in qmpjobd.versions.RELEASES")


@dataclass(frozen=True)
class Personality:
    """Everything version-specific about one impersonated QEMU release."""

    version: str                                  # "10.0"
    schema_conditions: frozenset[str] = field(default_factory=frozenset)

    @property
    def major(self) -> int:
        return release_key(self.version)[0]

    @property
    def minor(self) -> int:
        return release_key(self.version)[1]

    @property
    def micro(self) -> int:
        # We copy a release's behaviour, not one stable update's number.
        return 0

    def qemu_triple(self) -> dict[str, int]:
        """The ``qemu`` member of VersionInfo (greeting and query-version),
        members in QAPI declaration order."""
        return {"major": self.major, "minor": self.minor, "micro": self.micro}

    @property
    def package(self) -> str:
        """The ``package`` member of VersionInfo: says who answers, and as whom."""
        return f"qmpjobd {__version__} (QEMU {self.version} personality)"

    def version_info(self) -> dict:
        """The whole VersionInfo value, as the greeting and query-version show it."""
        return {"qemu": self.qemu_triple(), "package": self.package}

    def has(self, behaviour: Behaviour) -> bool:
        """Does this release show *behaviour*?"""
        mine = release_key(self.version)
        if mine < release_key(behaviour.since):
            return False
        return behaviour.until is None or mine < release_key(behaviour.until)


def _conditions_for(version: str) -> frozenset[str]:
    mine = release_key(version)
    since = {since_symbol(r) for r in RELEASES if release_key(r) <= mine}
    return frozenset(since | _BUILD_SYMBOLS[version])


PERSONALITIES: dict[str, Personality] = {
    v: Personality(v, _conditions_for(v)) for v in KNOWN_VERSIONS
}


def personality(version: str | Personality) -> Personality:
    """The personality named by *version* (``"10.0"``); raise UnknownVersion
    with the list of known versions otherwise.  A Personality passes through."""
    if isinstance(version, Personality):
        return version
    found = PERSONALITIES.get(str(version).strip())
    if found is None:
        raise UnknownVersion(f"unknown QEMU version {version!r}; "
                             f"known versions: {', '.join(KNOWN_VERSIONS)}")
    return found
