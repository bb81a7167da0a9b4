"""What the block layer does differently per QEMU release: one table, read like a changelog.

Each entry is a :class:`qmpjobd.versions.Behaviour`; code asks
``personality.has(ENTRY)``, never which version it is (DESIGN.md, decision 9).
``since`` is the release QEMU's documentation (or the first observation) names;
where only 7.2, 10.0 and 11.1 were observed and the release in between is not
known, the entry says so and names the first release that was seen to have it.

Schema differences (which arguments and members exist) live in ``schema/``; this
table holds what the schema cannot say: which members a reply fills in, message
texts, and side effects.
"""

from __future__ import annotations

from typing import Any

from qmpjobd.versions import Behaviour, Personality, personality

# The personality of a daemon that has none (lower-layer tests build a Daemon
# without a schema): 7.2, the release qmpjobd started as.
BASELINE: Personality = personality("7.2")


def personality_of(daemon: Any) -> Personality:
    """The daemon's personality, or BASELINE for a daemon without a schema."""
    try:
        return daemon.personality
    except AttributeError:
        return BASELINE

# --- query-named-block-nodes / query-block (BlockDeviceInfo, ImageInfo) -------------

NODE_ACTIVE_FLAG = Behaviour(
    "nodes can be inactive: BlockDeviceInfo reports 'active', blockdev-add takes "
    "'active', blockdev-set-active exists", since="10.0")
FILE_FORMAT_SPECIFIC = Behaviour(
    "file nodes report image.format-specific {'type': 'file', 'data': {}}", since="8.0")
NODE_CHILDREN_LIST = Behaviour(
    "BlockDeviceInfo lists the node's children ({'child': role, 'node-name': N})",
    since="10.1")
IMAGE_LIMITS = Behaviour(
    "ImageInfo (also each nested backing-image) reports the node's I/O limits",
    since="10.2")

# --- query-blockstats ---------------------------------------------------------------

ZONE_APPEND_STATS = Behaviour(
    "BlockDeviceStats has the six zone_append counters (also in 'parent')", since="8.1")

# --- block jobs -------------------------------------------------------------------------

MIRROR_ACTIVELY_SYNCED = Behaviour(
    "query-block-jobs gives mirror entries 'actively-synced'; block-job-change can "
    "switch a mirror to write-blocking", since="8.2")
INACTIVATE_DRAINS_ALL = Behaviour(
    "blockdev-set-active active=false drains every node, even when nothing becomes "
    "inactive (10.0 drains only the nodes it inactivates; first seen in 11.1, the "
    "release in between is unverified)", since="11.1")

# --- drivers ----------------------------------------------------------------------------

GLUSTER_REMOVED = Behaviour(
    "the gluster driver is gone from BlockdevDriver (the schema refuses it)", since="11.1")
BLKIO_DRIVERS_BUILT = Behaviour(
    "the libblkio drivers (io_uring, virtio-blk-*) are in the build, so an absent "
    "module reads \"Unknown driver '<name>'\" (Debian's 7.2 was built without them)",
    since="10.0")
BLKDEBUG_DELAY_NS = Behaviour(
    "blkdebug inject-error rules take 'delay-ns' (10.0.10 stable backport)", since="10.0")

QEMU_OPT_SIZE_RANGE_REWORDED = Behaviour(
    "a negative size in driver options that QEMU reads as QemuOpts (qcow2's cache "
    "sizes) reads \"Value '-5' is out of range for parameter 'P'\" instead of "
    "\"Parameter 'P' expects a non-negative number below 2^64\" (first seen in 10.0)",
    since="10.0")

# --- stderr -------------------------------------------------------------------------------

BACKUP_WARNING_REWORDED = Behaviour(
    "the backup block-size warning says 'The (default) block size ... exceeds this value'",
    since="10.0")
STDERR_PROGRAM_PREFIX = Behaviour(
    "every stderr message starts with 'qemu-storage-daemon: ' (first seen in 11.1)",
    since="11.1")
FLUSH_FAILURE_AT_CLOSE_REPORTED = Behaviour(
    "closing a node whose final flush fails prints \"Failed flush for '<name>' during "
    "close: <error>\" (first seen in 11.1)", since="11.1")

# Every entry, for tests and for a reader comparing two versions.
BLOCK_BEHAVIOURS: tuple[Behaviour, ...] = (
    NODE_ACTIVE_FLAG, FILE_FORMAT_SPECIFIC, NODE_CHILDREN_LIST, IMAGE_LIMITS,
    ZONE_APPEND_STATS, MIRROR_ACTIVELY_SYNCED, INACTIVATE_DRAINS_ALL, GLUSTER_REMOVED,
    BLKIO_DRIVERS_BUILT, BLKDEBUG_DELAY_NS, QEMU_OPT_SIZE_RANGE_REWORDED,
    BACKUP_WARNING_REWORDED,
    STDERR_PROGRAM_PREFIX, FLUSH_FAILURE_AT_CLOSE_REPORTED,
)
