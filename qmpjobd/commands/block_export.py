"""Block exports and the NBD server: nbd-server-start/-stop/-add/-remove,
block-export-add/-del and query-block-exports.

Thin handlers over ``qmpjobd.nbd.exports.ExportRegistry``; the checks and their
order live there.
"""

from __future__ import annotations

from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError
from qmpjobd.nbd.exports import DEFAULT_MAX_CONNECTIONS, registry_of


def legacy_address(addr: dict) -> dict:
    """SocketAddressLegacy ({type, data: {...}}) as a flat SocketAddress."""
    if addr["type"] == "fd":
        return {"type": "fd", "str": addr["data"]["str"]}
    return {"type": addr["type"], **addr["data"]}


def start_server(ctx_daemon, args: dict, addr: dict) -> None:
    """nbd-server-start and --nbd-server, once the address is flat."""
    registry_of(ctx_daemon).start_server(
        addr, tls_creds=args.get("tls-creds"),
        max_connections=args.get("max-connections", DEFAULT_MAX_CONNECTIONS),
        handshake_max_seconds=args.get("handshake-max-seconds"))


def add_export(daemon, args: dict) -> None:
    """block-export-add and --export."""
    if args["type"] != "nbd":
        raise QMPError(f"Export type '{args['type']}' is not supported by qmpjobd")
    registry_of(daemon).add_nbd(args)


@command("nbd-server-start")
def nbd_server_start(ctx: Context, args: dict) -> dict:
    start_server(ctx.daemon, args, legacy_address(args["addr"]))
    return {}


@command("nbd-server-stop")
def nbd_server_stop(ctx: Context, args: dict) -> dict:
    registry_of(ctx.daemon).stop_server()
    return {}


@command("nbd-server-add")
def nbd_server_add(ctx: Context, args: dict) -> dict:
    registry_of(ctx.daemon).server_add(args)
    return {}


@command("nbd-server-remove")
def nbd_server_remove(ctx: Context, args: dict) -> dict:
    registry_of(ctx.daemon).server_remove(args["name"], args.get("mode", "safe"))
    return {}


@command("block-export-add")
def block_export_add(ctx: Context, args: dict) -> dict:
    add_export(ctx.daemon, args)
    return {}


@command("block-export-del")
def block_export_del(ctx: Context, args: dict) -> dict:
    registry_of(ctx.daemon).delete(args["id"], args.get("mode", "safe"))
    return {}


@command("query-block-exports")
def query_block_exports(ctx: Context, args: dict) -> list:
    return registry_of(ctx.daemon).query()
