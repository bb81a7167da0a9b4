"""Block exports of a daemon and its NBD server: QEMU's block/export/export.c and
blockdev-nbd.c, minus the sockets (``qmpjobd.nbd.server``).

Everything here runs inside a QMP command (synchronously, as QEMU runs it under
its big lock). The checks come in QEMU's order with QEMU's texts; the only thing
that happens later is the deletion of an export whose clients are still being
disconnected, which then announces ``BLOCK_EXPORT_DELETED`` after the reply, as
QEMU does.

An export's BlockBackend is a graph change when it is inserted and when it goes
(``BlockGraph.graph_change``), and its release drains the exported node twice
first (blk_unref's and blk_remove_bs's blk_drain), so running jobs show QEMU's
paused/running pairs; a node the daemon opened itself (a ``-sync`` overlay the
export moved to) goes with its last export.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from qmpjobd.block import activation, dirty_bitmap, permissions
from qmpjobd.errors import QMPError
from qmpjobd.nbd import protocol as nbd
from qmpjobd.nbd.server import NbdExport, NbdServer
from qmpjobd.versions import Behaviour, Personality

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.graph import BlockGraph
    from qmpjobd.objects import ObjectRegistry

# The NBD behaviour differences between releases (qmpjobd/versions.py).
EXTENDED_HEADERS = Behaviour("NBD_OPT_EXTENDED_HEADERS and 64-bit request and reply headers",
                             since="8.2")
# The 7.2 message for an over-long request has a space before the closing
# parenthesis; it went with the 64-bit lengths of the extended headers, as did
# the old bad-magic message (later ones name the magic expected).
STRAY_SPACE_IN_LEN = Behaviour("'len (N )' in the over-long request message", since="7.2",
                               until="8.2")
# nbd-server-stop and daemon exit request every export's shutdown (newest first)
# and QEMU deletes each in a bottom half, the one scheduled last running first:
# 7.2 announces the oldest export's deletion first. From 8.0 blk_remove_bs takes
# the graph write lock, whose unlock runs the pending bottom halves, so each
# deletion runs the next one inside it and the newest is announced first.
NESTED_EXPORT_DELETIONS = Behaviour("an export's deletion runs the next pending one inside "
                                    "its graph write lock (newest announced first)",
                                    since="8.0")
# blk_exp_add activates the exported node unless allow-inactive (added with
# blockdev-set-active); its silent -ENOMEDIUM on a corrupt qcow2 makes
# block-export-add answer {} and add nothing.
EXPORT_ADD_ACTIVATES = Behaviour("block-export-add activates its node first; a node whose "
                                 "driver went makes it succeed without an export",
                                 since="10.0")
# The fixed 10 s handshake limit of 7.2.22 (a stable fix) became the
# handshake-max-seconds option.
HANDSHAKE_SECONDS_DEFAULT = 10
DEFAULT_MAX_CONNECTIONS = 100

_ID_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9\-._]*\Z")


def protocol_features(who: Personality) -> nbd.ProtocolFeatures:
    return nbd.ProtocolFeatures(extended_headers=who.has(EXTENDED_HEADERS),
                                stray_space_in_len_message=who.has(STRAY_SPACE_IN_LEN),
                                magic_message_names_expected=who.has(EXTENDED_HEADERS))


class ExportRegistry:
    """The daemon's block exports (every type shares one id space) and its NBD server."""

    def __init__(self, graph: "BlockGraph", objects: "ObjectRegistry",
                 personality: Callable[[], Personality], emit: Callable[[str, dict], None]) -> None:
        self.graph = graph
        self.objects = objects
        self._personality = personality
        self.emit = emit
        self.exports: list[NbdExport] = []      # newest first, as QEMU's list
        self.server: NbdServer | None = None

    @property
    def personality(self) -> Personality:
        return self._personality()

    def find(self, export_id: str) -> NbdExport | None:
        return next((e for e in self.exports if e.id == export_id), None)

    # --- nbd-server-start / -stop ----------------------------------------------------

    def start_server(self, addr: dict, *, tls_creds: str | None, max_connections: int,
                     handshake_max_seconds: int | None) -> None:
        if self.server is not None:
            raise QMPError("NBD server already running")
        timeout = HANDSHAKE_SECONDS_DEFAULT if handshake_max_seconds is None else handshake_max_seconds
        server = NbdServer(protocol_features(self.personality), max_connections=max_connections,
                           handshake_timeout_s=timeout)
        server.listen(addr)
        if tls_creds is not None:
            server.close()
            self._refuse_tls_creds(tls_creds)
        self.server = server

    def _refuse_tls_creds(self, ident: str) -> None:
        if ident not in self.objects:
            raise QMPError(f"No TLS credentials with id '{ident}'")
        # qmpjobd has no tls-creds-* object types: whatever the id names is not one.
        raise QMPError(f"Object with id '{ident}' is not TLS credentials")

    def stop_server(self) -> None:
        if self.server is None:
            raise QMPError("NBD server not running")
        self._delete_all()
        self.server.close()
        self.server = None

    def _delete_all(self) -> None:
        """Delete every export and every client of it before returning
        (nbd-server-stop waits for them, so all its events precede its reply)."""
        doomed = list(self.exports)     # newest first: shutdown is requested so
        for export in doomed:
            export.on_deleted = None
            export.shut_down()
            export.clients.clear()
        # ... and the deletion bottom halves run last scheduled first.
        self._delete_in_turn(doomed[::-1])

    def _delete_in_turn(self, pending: list[NbdExport]) -> None:
        if not pending:
            return
        first, rest = pending[0], pending[1:]
        if self.personality.has(NESTED_EXPORT_DELETIONS):
            self._deleted(first, inside=lambda: self._delete_in_turn(rest))
        else:
            self._deleted(first)
            self._delete_in_turn(rest)

    # --- block-export-add / -del ---------------------------------------------------------

    def add_nbd(self, args: dict) -> NbdExport | None:
        """block-export-add with type nbd; ``args`` validated by the schema.

        QEMU's order: the generic checks of blk_exp_add (id, node, read-only,
        iothread), then the export's BlockBackend is attached (a permission
        conflict with a job shows here), then the NBD driver's own checks; a
        failure after the attach detaches it again.
        """
        export_id = args["id"]
        if not _ID_PATTERN.match(export_id):
            raise QMPError("Invalid block export id")
        if self.find(export_id) is not None:
            raise QMPError(f"Block export id '{export_id}' is already in use")
        node = self.graph.find(args["node-name"])
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{args['node-name']}'")
        writable = args.get("writable", False)
        if writable and node.read_only:
            raise QMPError("Cannot export read-only node as writable")
        self._check_iothread(args.get("iothread"))
        allow_inactive = args.get("allow-inactive", False)
        if not allow_inactive and self.personality.has(EXPORT_ADD_ACTIVATES) \
                and not node.is_inserted():
            # blk_exp_add activates the node first (since 10.0, with
            # blockdev-set-active); bdrv_activate fails on a node whose driver a
            # fatal corruption dropped with -ENOMEDIUM and no error text, so QEMU
            # answers success and adds nothing.
            return None
        if not allow_inactive and not node.active:
            # An export that may not see an inactive node takes the image over
            # (blk_exp_add activates it, children first).
            activation.activate(self.graph, node)
        export = NbdExport(export_id, args.get("name", args["node-name"]), node,
                           writable=writable, description=args.get("description"),
                           writethrough=args.get("writethrough", False),
                           allocation_depth=args.get("allocation-depth", False),
                           bitmaps=(), multi_conn=False)
        export.allow_inactive = allow_inactive
        self._attach(export)
        try:
            self._nbd_checks(export, args)
        except QMPError:
            self._detach(export)
            raise
        assert self.server is not None
        export.set_multi_conn(self.server.max_connections != 1)
        # Marked busy only once every check passed, so a failure leaves nothing to undo;
        # busy until the export is gone (no remove, clear, merge or backup meanwhile).
        for bitmap in export.bitmaps:
            bitmap.busy = True
        self.exports.insert(0, export)
        self.server.exports[export.name] = export
        return export

    def _attach(self, export: NbdExport) -> None:
        """The export's BlockBackend on its node (blk_insert_bs, a graph change):
        consistent read (and write when writable), checked against every other
        user of the graph (jobs' filters and targets) by the block layer's
        permission checker. Held in ``node.backend_users``, which also makes
        blockdev-del refuse the node. A refused attach leaves a BlockBackend
        without a node, whose release drains nothing."""
        node = export.node
        with self.graph.graph_change("backend-insert"):
            node.backend_users.append(export)
            try:
                permissions.refresh(self.graph)
            except QMPError:
                node.backend_users.remove(export)
                permissions.refresh(self.graph, may_fail=False)
                raise

    def _detach(self, export: NbdExport, inside: Callable[[], None] | None = None) -> None:
        """blk_unref of the export's BlockBackend: it drains the node (so jobs above
        it pause and resume), then blk_remove_bs drains it again and takes the graph
        write lock to let go; ``inside`` runs at the lock's end (its bottom halves)."""
        node = export.node
        if export in node.backend_users:
            self._blk_drain(node)           # blk_unref
            self._blk_drain(node)           # blk_remove_bs
            with self.graph.graph_change("backend-remove"):
                node.backend_users.remove(export)
                permissions.refresh(self.graph, may_fail=False)
                # A node the daemon opened itself (a -sync overlay the export moved
                # to) goes with its last reference, before pending deletions run.
                if node.release_when_unused:
                    self.graph.release_implicit(node)
                if inside is not None:
                    inside()
        elif inside is not None:
            inside()

    def _blk_drain(self, node: Any) -> None:
        """blk_drain: a drained section of the node (jobs above it pause and resume)."""
        with self.graph.artefact_drain([node]):
            pass

    def _nbd_checks(self, export: NbdExport, args: dict) -> None:
        """nbd_export_create's checks, in its order; fills in the bitmaps."""
        if self.server is None:
            raise QMPError("NBD server not running")
        name = export.name
        if len(name.encode()) > nbd.MAX_STRING_SIZE:
            raise QMPError(f"export name '{name}' too long")
        description = export.description
        if description is not None and len(description.encode()) > nbd.MAX_STRING_SIZE:
            raise QMPError(f"description '{description}' too long")
        if self.server.export_named(name) is not None:
            raise QMPError(f"NBD server already has export named '{name}'")
        if not export.node.is_inserted():
            raise QMPError("Failed to determine the NBD export's length: No medium found")
        export.bitmaps = [self._export_bitmap(export.node, entry, export.writable)
                          for entry in args.get("bitmaps", [])]

    def _check_iothread(self, iothread: Any) -> None:
        names = [] if iothread is None else [iothread] if isinstance(iothread, str) else iothread
        for ident in names:
            if self.objects.get(ident, "iothread") is None:
                raise QMPError(f"iothread \"{ident}\" not found")

    def _export_bitmap(self, node: Any, entry: Any, writable: bool) -> Any:
        """An entry of ``bitmaps`` (QEMU's nbd_export_create): a name searched on the
        node and down its filter/backing chain, or {node, name}; then the busy and
        inconsistent checks (a read-only bitmap may be exported)."""
        if isinstance(entry, str):
            holder, bitmap = _find_in_chain(node, entry)
            if bitmap is None:
                raise QMPError(f"Bitmap '{entry}' is not found")
            if not writable and not holder.read_only and bitmap.recording:
                raise QMPError(f"Enabled bitmap '{entry}' incompatible with readonly export")
        else:
            holder = self.graph.find(entry["node"])
            if holder is None:
                raise QMPError(f"Node '{entry['node']}' not found")
            bitmap = _find_bitmap(holder, entry["name"])
            if bitmap is None:
                raise QMPError(f"Dirty bitmap '{entry['name']}' not found")
        # A read-only bitmap may be exported; a busy or inconsistent one not.
        bitmap.check(dirty_bitmap.CHECK_BUSY | dirty_bitmap.CHECK_INCONSISTENT)
        return bitmap

    def delete(self, export_id: str, mode: str = "safe") -> None:
        export = self.find(export_id)
        if export is None:
            raise QMPError(f"Export '{export_id}' is not found")
        if export.shutting_down:
            raise QMPError(f"Export '{export_id}' is already shutting down")
        if mode == "safe" and export.clients:
            raise QMPError(f"export '{export_id}' still in use")
        export.on_deleted = self._deleted
        # With no client this completes (and announces itself) at once; otherwise
        # once the last disconnected client is gone, after the reply.
        export.shut_down()

    def _deleted(self, export: NbdExport, inside: Callable[[], None] | None = None) -> None:
        """blk_exp_delete_bh: the export goes, its BlockBackend is released (running
        ``inside`` there), then its deletion is announced."""
        if export in self.exports:
            self.exports.remove(export)
        if self.server is not None and self.server.exports.get(export.name) is export:
            del self.server.exports[export.name]
        self._detach(export, inside)
        for bitmap in export.bitmaps:
            bitmap.busy = False
        self.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    # --- nbd-server-add / -remove (deprecated) --------------------------------------------

    def server_add(self, args: dict) -> None:
        if self.server is None:
            raise QMPError("NBD server not running")
        device = args["device"]
        node = self.graph.find(device)
        if node is None:
            raise QMPError(f"Cannot find device='{device}' nor node-name='{device}'")
        name = args.get("name", device)
        options: dict = {"type": "nbd", "id": name, "node-name": node.node_name,
                         "name": name}
        if "description" in args:
            options["description"] = args["description"]
        # A read-only device is exported read-only rather than refused.
        writable = args.get("writable", False) and not node.read_only
        options["writable"] = writable
        if "bitmap" in args:
            options["bitmaps"] = [args["bitmap"]]
        self.add_nbd(options)

    def server_remove(self, name: str, mode: str) -> None:
        # Every export qmpjobd makes is an NBD one, so QEMU's "is not an NBD
        # export" check has nothing to refuse.
        self.delete(name, mode)

    # --- queries and shutdown --------------------------------------------------------------

    def query(self) -> list[dict]:
        return [{"id": e.id, "type": "nbd", "node-name": e.node.node_name,
                 "shutting-down": e.shutting_down} for e in self.exports]

    def close(self, unlink: bool = True) -> None:
        """Stop listening and drop every client."""
        if self.server is not None:
            self.server.close(unlink=unlink)
            self.server = None

    def close_all(self) -> None:
        """Daemon exit, as qemu-storage-daemon's blk_exp_close_all: every export is
        deleted (in nbd-server-stop's order, each with BLOCK_EXPORT_DELETED) before
        the jobs are cancelled, and the NBD server stops listening (its unix
        socket file stays, as qemu-storage-daemon leaves it)."""
        self._delete_all()
        self.close(unlink=False)


def _find_bitmap(node: Any, name: str) -> Any:
    finder = getattr(node, "find_dirty_bitmap", None)
    if finder is not None:
        return finder(name)
    return next((b for b in node.dirty_bitmaps if getattr(b, "name", None) == name), None)


def _find_in_chain(node: Any, name: str) -> tuple[Any, Any]:
    """(holder, bitmap) of the first bitmap called ``name`` on the node or below it
    through filter and backing children (QEMU's bdrv_filter_or_cow_bs walk)."""
    while node is not None:
        bitmap = _find_bitmap(node, name)
        if bitmap is not None:
            return node, bitmap
        node = node.filter_or_cow_child()
    return None, None



def close_exports(daemon: Any) -> None:
    """At daemon exit: close the exports, if any were ever made."""
    registry = daemon.__dict__.get("_block_exports")
    if registry is not None:
        registry.close_all()


def registry_of(daemon: Any) -> ExportRegistry:
    """The daemon's export registry, made on first use."""
    registry = daemon.__dict__.get("_block_exports")
    if registry is None:
        registry = ExportRegistry(daemon.graph, daemon.objects, lambda: daemon.personality,
                                  daemon.emit)
        daemon.__dict__["_block_exports"] = registry
    return registry
