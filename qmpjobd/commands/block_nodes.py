"""Block node commands: blockdev-add, blockdev-del, query-named-block-nodes."""

from __future__ import annotations

from qmpjobd.block.query import named_block_nodes
from qmpjobd.commands import Context, command


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
