"""``blockdev-mirror`` and ``drive-mirror`` (see qmpjobd.block.jobs.mirror).

Checks run in QEMU 7.2's order: the source must be a root node, the target is looked
up (drive-mirror: created and opened), then blockdev_mirror_common's checks
(granularity, busy nodes, replaces, sync mode), then the job is created (buf-size,
"into itself", speed, read-only target) and started at once.
"""

from __future__ import annotations

from typing import Any

from qmpjobd.block.personality import MIRROR_ACTIVELY_SYNCED, personality_of
from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError
from qmpjobd.job.states import JobVerb, check_verb

# QEMU format drivers that exist but cannot create images.
NO_CREATE = ("null-co", "null-aio", "blkdebug", "blkverify", "blkreplay", "copy-on-read",
              "compress", "preallocate", "throttle", "copy-before-write", "snapshot-access",
              "nbd", "http", "https", "ftp", "ftps", "host_cdrom", "host_device", "vvfat",
              "quorum", "replication")


def start_mirror(ctx: Context, source: Any, target: Any, args: dict, *,
                 zero_target: bool, source_backing_chain: bool = False) -> None:
    """blockdev_mirror_common + mirror_start: checks, then create and start the job."""
    # Job drivers load on first use: a daemon's start-up does not need them.
    from qmpjobd.block.jobs.mirror import MirrorJob, check_granularity

    graph = ctx.daemon.graph
    check_granularity(args.get("granularity", 0))
    source.check_not_busy()
    target.check_not_busy()
    replaces = None
    if "replaces" in args:
        replaces = graph.find(args["replaces"])
        if replaces is None:
            raise QMPError(f"Failed to find node with node-name='{args['replaces']}'")
        replaces.check_not_busy()
        if replaces is not source:
            raise QMPError(f"Cannot replace '{replaces.node_name}' by a node mirrored from "
                           f"'{source.node_name}', because it cannot be guaranteed that doing "
                           "so would not lead to an abrupt change of visible data")
    sync = args["sync"]
    if sync in ("incremental", "bitmap"):
        raise QMPError(f"Sync mode '{sync}' not supported")
    job = MirrorJob(
        ctx.daemon.jobs, graph,
        # Without job-id QEMU uses the BlockBackend name, which qsd nodes never have.
        args.get("job-id", ""),
        source, target,
        sync=sync,             # the job copies only what lies above the backing for top
        replaces=replaces,
        speed=args.get("speed", 0),
        granularity=args.get("granularity", 0),
        buf_size=args.get("buf-size", 0),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
        filter_node_name=args.get("filter-node-name"),
        zero_target=zero_target,
        source_backing_chain=source_backing_chain,
        copy_mode=args.get("copy-mode", "background"),
        target_is_zero=args.get("target-is-zero", False),
        reports_actively_synced=personality_of(ctx.daemon).has(MIRROR_ACTIVELY_SYNCED),
    )
    job.start()


@command("blockdev-mirror")
def blockdev_mirror(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    source = graph.lookup_root(args["device"])
    if not source.is_inserted():
        raise QMPError("Device has no medium")       # qmp_get_root_bs
    target = graph.lookup(args["target"])
    graph.graph_changes("aio-context")     # bdrv_try_change_aio_context(target)
    start_mirror(ctx, source, target, args, zero_target=(args["sync"] == "full"))
    return {}


def open_target_file(ctx: Context, source: Any, args: dict, *,
                     extra_options: dict | None = None,
                     backing_source: Any = None,
                     open_backing: bool = False) -> tuple[Any, bool]:
    """drive-mirror/drive-backup: create (unless ``mode`` is existing) and open the
    target image; returns (node, created_new). Formats: raw, file and qcow2.

    ``backing_source`` is the node whose filename and format a new qcow2 target
    records as its backing file (QEMU's bdrv_img_create with the source's or its
    backing's name). The target opens without its backing chain (QEMU's
    BDRV_O_NO_BACKING) unless ``open_backing``. The node is dropped by the graph
    once the job using it lets go (or by the caller on error)."""
    from qmpjobd.commands.snapshot import create_image

    mode = args.get("mode", "absolute-paths")
    fmt = args.get("format")
    if fmt is None and mode != "existing":
        fmt = source.driver
    filename = args["target"]
    graph = ctx.daemon.graph
    if mode != "existing":
        if fmt in NO_CREATE:
            raise QMPError(f"Format driver '{fmt}' does not support image creation")
        if fmt not in _TARGET_FORMATS:
            raise QMPError(f"Driver '{fmt}' is not supported by qmpjobd")
        if fmt == "qcow2":
            backing = backing_source
            create_image(graph, filename, fmt, source.size,
                         backing.filename() if backing is not None else None,
                         backing.driver if backing is not None else None)
        else:
            from qmpjobd.block.jobs.create import check_not_in_use, create_file

            check_not_in_use(graph, filename)
            create_file(filename, source.size, policy=graph.path_policy)
    elif fmt is not None and fmt not in _TARGET_FORMATS:
        raise QMPError(f"Driver '{fmt}' is not supported by qmpjobd")
    options: dict = {"driver": fmt or "raw", **(extra_options or {})}
    if "node-name" in args:
        options["node-name"] = args["node-name"]
    if options["driver"] == "file":
        options["filename"] = filename
    else:
        options["file"] = {"driver": "file", "filename": filename}
    if options["driver"] == "qcow2" and not open_backing:
        options["backing"] = None
    return graph.open_implicit(options), mode != "existing"


# The formats a drive-mirror/drive-backup target may have here.
_TARGET_FORMATS = ("raw", "file", "qcow2")


def mirror_backing_source(source: Any, sync: str) -> Any:
    """drive-mirror: the node a new target names as its backing file: the
    source's backing for sync=top, the source itself for none, nothing for full
    (or a top without a backing)."""
    if sync == "none":
        return source
    if sync == "top":
        return source.backing_node()
    return None


@command("drive-mirror")
def drive_mirror(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    source = graph.lookup_root(args["device"])
    if not source.is_inserted():
        raise QMPError("Device has no medium")       # qmp_get_root_bs
    if "replaces" in args and "node-name" not in args:
        raise QMPError("a node-name must be provided when replacing a named node of the graph")
    if args["sync"] == "top" and source.backing_node() is None:
        # QEMU turns top into full for a source without a backing file.
        args = {**args, "sync": "full"}
    target, created = open_target_file(
        ctx, source, args, backing_source=mirror_backing_source(source, args["sync"]))
    try:
        graph.graph_changes("aio-context")     # bdrv_try_change_aio_context(target)
        # A new image reads as zeroes already; an existing one must be overwritten.
        start_mirror(ctx, source, target, args,
                     zero_target=(args["sync"] == "full" and not created),
                     source_backing_chain=(args.get("mode", "absolute-paths")
                                           == "absolute-paths"))
    except BaseException:
        graph.release_implicit(target)
        raise
    return {}


@command("block-job-change")
def block_job_change(ctx: Context, args: dict) -> dict:
    """Only mirror can change (its copy mode). QEMU reads the options through the
    union branch that ``type`` names, not the job's real type: on a mirror, any
    other ``type`` reads as copy mode ``background``."""
    job = ctx.daemon.jobs.find_block_job(args["id"])
    check_verb(job, JobVerb.CHANGE)
    # Active commit runs mirror's code but its driver has no .change callback.
    change = getattr(job, "change_copy_mode", None) if job.job_type == "mirror" else None
    if change is None:
        raise QMPError("Job type does not support change")
    change(args["copy-mode"] if args["type"] == "mirror" else "background")
    return {}
