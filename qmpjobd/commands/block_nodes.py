"""Block node commands: blockdev-add, blockdev-del, blockdev-set-active, the node
queries and the write threshold.

What each release puts in the query replies is the block layer's business
(qmpjobd.block.query with the daemon's personality); the handlers only pass it on.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from qmpjobd.block.activation import activate, inactivate, nodes_to_inactivate
from qmpjobd.block.drivers import check_module_drivers, uses_module_driver
from qmpjobd.block.personality import (
    BLKIO_DRIVERS_BUILT,
    INACTIVATE_DRAINS_ALL,
    personality_of,
)
from qmpjobd.block.query import block_stats, named_block_nodes
from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError


@command("blockdev-add")
def blockdev_add(ctx: Context, args: dict) -> dict:
    if "node-name" in args and uses_module_driver(args):   # else graph.add decides
        check_module_drivers(args, personality_of(ctx.daemon).has(BLKIO_DRIVERS_BUILT))
    ctx.daemon.graph.add(args)
    return {}


@command("blockdev-del")
def blockdev_del(ctx: Context, args: dict) -> dict:
    ctx.daemon.graph.delete(args["node-name"])
    return {}


@command("blockdev-set-active")
def blockdev_set_active(ctx: Context, args: dict) -> dict:
    graph = ctx.daemon.graph
    node = None
    if "node-name" in args:
        node = graph.find(args["node-name"])
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{args['node-name']}'")
    if args["active"]:
        activate(graph, node)
        return {}
    # Inactivation runs in a drained section (jobs there show paused/running):
    # 10.0 drains the nodes it changes, after its checks; later releases drain
    # every node first, so even a refusal shows the section.
    if personality_of(ctx.daemon).has(INACTIVATE_DRAINS_ALL):
        with _drained(ctx, None):
            inactivate(nodes_to_inactivate(graph, node), graph)
        return {}
    reached = nodes_to_inactivate(graph, node)
    with _drained(ctx, reached):
        inactivate(reached, graph)
    return {}


def _drained(ctx: Context, nodes: list | None) -> ContextManager[None]:
    """A drained section on ``nodes`` (None: all), unless drain artefacts are off
    or there is nothing to drain."""
    if not ctx.daemon.options.drain_artefacts or nodes == []:
        return contextlib.nullcontext()
    return ctx.daemon.graph.drained(nodes)


@command("query-named-block-nodes")
def query_named_block_nodes(ctx: Context, args: dict) -> list:
    return named_block_nodes(ctx.daemon.graph, flat=args.get("flat", False),
                             who=personality_of(ctx.daemon))


@command("query-block")
def query_block(ctx: Context, args: dict) -> list:
    # Only named backends and attached devices are listed; a storage daemon has
    # neither, so the answer is empty with or without ``flat`` (11.1 takes it).
    return []


@command("query-blockstats")
def query_blockstats(ctx: Context, args: dict) -> list:
    return block_stats(ctx.daemon.graph, query_nodes=args.get("query-nodes", False),
                       who=personality_of(ctx.daemon))


@command("block-set-write-threshold")
def block_set_write_threshold(ctx: Context, args: dict) -> dict:
    node = ctx.daemon.graph.find(args["node-name"])
    if node is None:
        raise QMPError(f"Device '{args['node-name']}' not found")
    node.write_threshold = args["write-threshold"]
    return {}
