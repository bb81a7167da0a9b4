"""``query-named-block-nodes``: BlockDeviceInfo dicts, members in QAPI declaration order.

Only what a qmpjobd node can have is reported: no COW backing files, throttling or
encryption; the non-flat form follows filters (blkdebug, mirror_top) down to their
child as QEMU does. Values match qemu-storage-daemon 7.2 for null-co, file, raw and
blkdebug nodes (compared field by field in tests/unit/test_block_query.py).

Which members a release fills in (``active``, ``children``, ``image.limits``, the
file driver's ``format-specific``, the zone_append counters) comes from the block
layer's behaviour table, :mod:`qmpjobd.block.personality`; every function takes
the daemon's personality and defaults to 7.2's shape.
"""

from __future__ import annotations

from qmpjobd.block.graph import BlockGraph
from qmpjobd.block.node import BlockNode
from qmpjobd.block.personality import (
    FILE_FORMAT_SPECIFIC,
    IMAGE_LIMITS,
    NODE_ACTIVE_FLAG,
    NODE_CHILDREN_LIST,
    ZONE_APPEND_STATS,
)
from qmpjobd.versions import Personality, personality as personality_named

# The shape of query replies when a caller names no personality.
_BASELINE = personality_named("7.2")


def image_info(node: BlockNode, flat: bool, who: Personality = _BASELINE) -> dict:
    """ImageInfo: filename, format, dirty-flag?, actual-size?, virtual-size,
    limits?, format-specific?, backing-image? (only when not flat: the next node
    down the chain of backing and filtered children, so a blkdebug node shows its
    image here)."""
    info: dict = {"filename": node.filename(), "format": node.driver}
    if node.has_dirty_flag():
        info["dirty-flag"] = node.image_dirty()
    actual = node.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = node.size
    info.update(node.image_details())
    if who.has(IMAGE_LIMITS):
        info["limits"] = node.block_limits()
    specific = format_specific(node, who)
    if specific is not None:
        info["format-specific"] = specific
    backing = node.filter_or_cow_child()
    if backing is not None and not flat:
        info["backing-image"] = image_info(backing, flat, who)
    return info


def format_specific(node: BlockNode, who: Personality) -> dict | None:
    """ImageInfoSpecific: the file driver's (its extent-size-hint is left out, as
    QEMU leaves it out for files on ordinary file systems), or a format driver's
    own (qcow2)."""
    if node.driver == "file" and who.has(FILE_FORMAT_SPECIFIC):
        return {"type": "file", "data": {}}
    return node.format_specific_info(who)


def children_info(node: BlockNode) -> list[dict]:
    """BlockdevChild entries in child order: role, then node name."""
    return [{"child": role, "node-name": child.node_name}
            for role, child in node.children.items()]


def backing_depth(node: BlockNode) -> int:
    depth = 0
    backing = node.filter_or_cow_child()
    while backing is not None:
        depth += 1
        backing = backing.filter_or_cow_child()
    return depth


def cache_flag(node: BlockNode, key: str) -> bool:
    """A node's cache.direct / cache.no-flush: its own option, else the value of
    the parent that opened it (bdrv_inherited_options copies both into every
    child a node opens itself: inline children and the backing chain named by
    an image header; a child referenced by node name keeps its own)."""
    seen: set[int] = set()
    current: BlockNode | None = node
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cache = current.options.get("cache")
        if isinstance(cache, dict) and key in cache:
            return bool(cache[key])
        current = getattr(current, "inherits_from", None)
    return False


def block_device_info(node: BlockNode, flat: bool = False,
                      who: Personality = _BASELINE) -> dict:
    info: dict = {
        "file": node.filename(),
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver,
    }
    backing_file = node.backing_file_name()
    if backing_file is not None:
        info["backing_file"] = backing_file
    info.update({
        # QEMU only walks the chain (and counts it) for the non-flat form.
        "backing_file_depth": 0 if flat else backing_depth(node),
    })
    if who.has(NODE_CHILDREN_LIST):
        info["children"] = children_info(node)
    if who.has(NODE_ACTIVE_FLAG):
        info["active"] = node.active
    info.update({
        "encrypted": False,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": image_info(node, flat, who),
        "cache": {
            "writeback": True,
            "direct": cache_flag(node, "direct"),
            "no-flush": cache_flag(node, "no-flush"),
        },
        "write_threshold": node.write_threshold,
    })
    bitmaps = node.dirty_bitmap_infos()
    if bitmaps:
        info["dirty-bitmaps"] = bitmaps
    return info


def named_block_nodes(graph: BlockGraph, flat: bool = False,
                      who: Personality = _BASELINE) -> list[dict]:
    """Every node, newest first (QEMU prepends while walking its node list).

    ``flat`` leaves out the chains below filter nodes (blkdebug, mirror_top).
    """
    return [block_device_info(node, flat, who)
            for node in reversed(list(graph.nodes.values()))]


# BlockDeviceStats members a node has; only wr_highest_offset is tracked per node
# (QEMU keeps the other counters on BlockBackends, which a storage daemon has none of).
_ZERO_STAT_NAMES = (
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
    "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
    "flush_total_time_ns", "unmap_total_time_ns", "rd_merged", "wr_merged", "unmap_merged",
    "failed_rd_operations", "failed_wr_operations", "failed_flush_operations",
    "failed_unmap_operations", "invalid_rd_operations", "invalid_wr_operations",
    "invalid_flush_operations", "invalid_unmap_operations",
)
# The same with the zone_append counters, each in its declared place (they sit
# next to their wr_* siblings in BlockDeviceStats).
_ZERO_STAT_NAMES_ZONED = (
    "rd_bytes", "wr_bytes", "zone_append_bytes", "unmap_bytes", "rd_operations",
    "wr_operations", "zone_append_operations", "flush_operations", "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "zone_append_total_time_ns",
    "flush_total_time_ns", "unmap_total_time_ns", "rd_merged", "wr_merged",
    "zone_append_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_zone_append_operations", "failed_flush_operations", "failed_unmap_operations",
    "invalid_rd_operations", "invalid_wr_operations", "invalid_zone_append_operations",
    "invalid_flush_operations", "invalid_unmap_operations",
)


def node_stats(node: BlockNode, who: Personality = _BASELINE) -> dict:
    """BlockStats of one node as ``query-blockstats query-nodes=true`` gives it:
    the node's own figures, driver-specific ones for ``file``, and the data child's
    BlockStats as ``parent``."""
    names = _ZERO_STAT_NAMES_ZONED if who.has(ZONE_APPEND_STATS) else _ZERO_STAT_NAMES
    stats: dict = dict.fromkeys(names, 0)
    stats.update({"wr_highest_offset": node.wr_highest_offset, "account_invalid": False,
                  "account_failed": False, "timed_stats": []})
    info: dict = {"node-name": node.node_name, "stats": stats}
    if node.driver == "file":
        # qmpjobd never sends discard requests, so the counters stay 0.
        info["driver-specific"] = {"driver": "file", "discard-nb-ok": 0,
                                   "discard-nb-failed": 0, "discard-bytes-ok": 0}
    child = node.file_child
    if child is not None:
        info["parent"] = node_stats(child, who)
    return info


def block_stats(graph: BlockGraph, query_nodes: bool,
                who: Personality = _BASELINE) -> list[dict]:
    """Every node oldest first with ``query_nodes``; else the named backends (none)."""
    if not query_nodes:
        return []
    return [node_stats(node, who) for node in graph.nodes.values()]
