"""Block exports: qmpjobd exports nothing, so the list is always empty."""

from __future__ import annotations

from qmpjobd.commands import Context, command


@command("query-block-exports")
def query_block_exports(ctx: Context, args: dict) -> list:
    return []
