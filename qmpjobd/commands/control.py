"""Control commands: capabilities negotiation, version, introspection, quit."""

from __future__ import annotations

from qmpjobd import __version__
from qmpjobd.commands import HANDLERS, Context, command

# What qmpjobd reports as the QEMU version it is compatible with. Clients such as
# qmp-shell read these three numbers from the greeting; `package` says who we are.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}


def version_info() -> dict:
    """The VersionInfo value shared by the greeting and query-version."""
    # Members in QAPI declaration order; the encoder applies QEMU's key order.
    return {"qemu": dict(QEMU_VERSION), "package": f"qmpjobd {__version__}"}


@command("qmp_capabilities")
def qmp_capabilities(ctx: Context, args: dict) -> dict:
    ctx.session.negotiate(args.get("enable", []))
    return {}


@command("query-version")
def query_version(ctx: Context, args: dict) -> dict:
    return version_info()


@command("query-commands")
def query_commands(ctx: Context, args: dict) -> list:
    # QEMU lists commands in reverse registration order.
    names = [n for n in ctx.daemon.schema.command_names_registration_order() if n in HANDLERS]
    return [{"name": name} for name in reversed(names)]


@command("query-qmp-schema")
def query_qmp_schema(ctx: Context, args: dict) -> list:
    return ctx.daemon.schema.introspect()


@command("quit")
def quit_(ctx: Context, args: dict) -> dict:
    # The server sends this reply, then closes every connection and exits.
    ctx.daemon.quit_requested = True
    return {}
