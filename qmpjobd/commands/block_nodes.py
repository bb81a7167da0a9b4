"""Block node commands: blockdev-add, blockdev-del, the node queries and the
write threshold."""

from __future__ import annotations

from qmpjobd.block.query import block_stats, named_block_nodes
from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError


@command("blockdev-add")
def blockdev_add(ctx: Context, args: dict) -> dict:
    ctx.daemon.graph.add(args)
    return {}


@command("blockdev-del")
def blockdev_del(ctx: Context, args: dict) -> dict:
    ctx.daemon.graph.delete(args["node-name"])
    return {}


@command("query-named-block-nodes")
def query_named_block_nodes(ctx: Context, args: dict) -> list:
    return named_block_nodes(ctx.daemon.graph, flat=args.get("flat", False))


@command("query-block")
def query_block(ctx: Context, args: dict) -> list:
    # Only named backends and attached devices are listed; a storage daemon has neither.
    return []


@command("query-blockstats")
def query_blockstats(ctx: Context, args: dict) -> list:
    return block_stats(ctx.daemon.graph, query_nodes=args.get("query-nodes", False))


@command("block-set-write-threshold")
def block_set_write_threshold(ctx: Context, args: dict) -> dict:
    node = ctx.daemon.graph.find(args["node-name"])
    if node is None:
        raise QMPError(f"Device '{args['node-name']}' not found")
    node.write_threshold = args["write-threshold"]
    return {}
