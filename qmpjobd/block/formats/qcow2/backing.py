"""Backing-chain helpers the graph-changing jobs need from the qcow2 format.

* ``change_backing_file(node, name, fmt)``: QEMU's qcow2_change_backing_file, the
  header rewrite a stream or commit makes in its prepare step: the backing file
  name (``None``: no backing at all, ``backing_file_offset`` 0) and the backing
  format extension (``None``: the extension goes). The header is rewritten as a
  whole cluster and flushed, as qcow2_update_header does.
* ``layer_status(node, offset, length)``: what one layer holds at ``offset``,
  without looking below it (QEMU's bdrv_is_allocated): ``"data"``, ``"zero"`` or
  ``"unallocated"``, and for how many bytes the answer holds.
* ``status_in_layers(first, last, offset, length)``: the first allocated layer's
  answer from ``first`` down to and including ``last`` (QEMU's
  bdrv_is_allocated_above with include_base), filters skipped.

The functions take the graph node (``Qcow2Node``) because that is what jobs hold;
everything they touch of the format is the node's ``image`` object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qmpjobd.errors import QMPError

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.block.node import BlockNode
    from qmpjobd.versions import Personality

# QEMU refuses backing names longer than this (qcow2_change_backing_file).
BACKING_NAME_MAX = 1023

UNALLOCATED = "unallocated"


def is_qcow2(node: "BlockNode") -> bool:
    return getattr(node, "image", None) is not None and node.driver == "qcow2"


def change_backing_file(node: "BlockNode", name: str | None, fmt: str | None) -> None:
    """Write ``name``/``fmt`` as the image's backing file into its header.

    Synchronous: the header is one cluster at offset 0 of a ``file`` child, and
    QEMU's prepare step writes it from the main loop as well. Raises OSError as
    the write does; a name QEMU would refuse gives EINVAL before anything changes.
    """
    import errno
    import os

    from qmpjobd.block.drivers.qcow2 import SyncStorage, run_now, write_back

    image = node.image  # type: ignore[attr-defined]
    if name is not None and len(name.encode()) > BACKING_NAME_MAX:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    # The chain's cached L2 tables and refcounts go out first: a header that no
    # longer names the old backing file must never meet files that lack the
    # clusters a stream copied up or a commit copied down (a SIGKILL right after
    # it would lose them). Written, not flushed, like the header itself: a flush
    # here would write out the whole copied data inside the job.
    layer: "BlockNode | None" = node
    while layer is not None:
        if is_qcow2(layer):
            write_back(layer, layer.image, ordering_flushes=False)  # type: ignore[attr-defined]
        layer = layer.filter_or_cow_child()
    header = image.header
    old = (header.backing_file, header.backing_format)
    header.backing_file = name
    header.backing_format = fmt if name is not None else None
    try:
        cluster = header.pack()
        storage = SyncStorage(node.children["file"])
        # Written, not flushed: QEMU's qcow2_update_header does no flush either
        # (the header reaches the disk with the node's next flush or close).
        run_now(storage.pwrite(0, cluster))
    except (OSError, QMPError):
        header.backing_file, header.backing_format = old
        raise
    # The node's name no longer comes from what the header named at open.
    node.opened_backing_from_header = False  # type: ignore[attr-defined]


def skip_filters(node: "BlockNode | None") -> "BlockNode | None":
    """QEMU's bdrv_skip_filters: go down through filter nodes."""
    while node is not None and node.is_filter:
        child = node.backing_node() or node.file_child
        if child is None:
            break
        node = child
    return node


def cow_child(node: "BlockNode") -> "BlockNode | None":
    """QEMU's bdrv_backing_chain_next: the COW backing below ``node``'s filters."""
    below = skip_filters(node)
    if below is None or below.is_filter:
        return None
    return skip_filters(below.backing_node())


def find_overlay(active: "BlockNode", base: "BlockNode | None") -> "BlockNode | None":
    """QEMU's bdrv_find_overlay: the node of ``active``'s chain whose COW backing is
    ``base`` (None: the bottom of the chain); None when ``base`` is not below."""
    node = skip_filters(active)
    base = skip_filters(base)
    while node is not None:
        below = cow_child(node)
        if below is base:
            return node
        node = below
    return None


def layer_status(node: "BlockNode", offset: int, length: int) -> tuple[str, int]:
    """Allocation of ``node``'s own layer (filters skipped) at ``offset``."""
    below = skip_filters(node)
    assert below is not None
    if not is_qcow2(below):
        # Formats without backing files hold everything (QEMU reports
        # BDRV_BLOCK_ALLOCATED for every extent of them).
        kind, count = below.block_status(offset, length)
        return ("zero" if kind == "zero" else "data"), max(count, 1)
    # The qcow2 driver scans its L2 tables: "data", "zero" or "unallocated".
    return below.layer_status(offset, length)  # type: ignore[attr-defined]


def status_in_layers(first: "BlockNode | None", last: "BlockNode | None",
                     offset: int, length: int) -> tuple[str, int]:
    """The answer of the first layer from ``first`` down to ``last`` (inclusive)
    that holds ``offset``; ``"unallocated"`` when none does. ``last`` None: the
    whole chain."""
    count = max(length, 1)
    node = skip_filters(first)
    last = skip_filters(last)
    while node is not None:
        kind, n = layer_status(node, offset, count)
        count = min(count, n)
        if kind != UNALLOCATED:
            return kind, count
        if node is last:
            break
        node = cow_child(node)
    return UNALLOCATED, count


def chain_nodes(top: "BlockNode", base: "BlockNode | None") -> list["BlockNode"]:
    """Every node from ``top`` down to, not including, ``base`` through backing and
    filtered children (QEMU's bdrv_filter_or_cow_bs walk)."""
    nodes: list[BlockNode] = []
    node: BlockNode | None = top
    while node is not None and node is not base:
        nodes.append(node)
        node = node.filter_or_cow_child()
    return nodes


def chain_contains(top: "BlockNode", wanted: "BlockNode") -> bool:
    """QEMU's bdrv_chain_contains: ``wanted`` is ``top`` or below it."""
    node: BlockNode | None = top
    while node is not None:
        if node is wanted:
            return True
        node = node.filter_or_cow_child()
    return False


# --- the backing file an image header names (bdrv_open_backing_file) ------------------

# Protocol prefixes qmpjobd has a driver for (bdrv_find_protocol; a name like
# "nbd:..." names a protocol QEMU has and qmpjobd has not: it is unknown here).
_PROTOCOLS = ("file", "null-co", "null-aio")


def path_has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol: a ':' before the first '/'."""
    cut = len(name)
    for sep in ":/":
        index = name.find(sep)
        if index >= 0:
            cut = min(cut, index)
    return cut < len(name) and name[cut] == ":"


def full_backing_filename(name: str, overlay_file: str | None) -> str:
    """bdrv_make_absolute_filename: a name with a protocol or an absolute path stays;
    a relative one is taken from the directory of the overlay's file."""
    if path_has_protocol(name) or name.startswith("/"):
        return name
    directory, slash, _ = (overlay_file or "").rpartition("/")
    return directory + slash + name


def open_header_backing(node: "BlockNode") -> "BlockNode | None":
    """bdrv_open_backing_file for a qcow2 node without a ``backing`` option: open
    what its header names, read-only, with QEMU's "Could not open backing file"
    errors. The node is marked ``opened_backing_from_header``; the backing node
    is marked ``probed`` when its format was guessed from its first bytes."""
    image = getattr(node, "image", None)
    header = image.header if image is not None else None
    if header is None or header.backing_file is None:
        return None
    graph = node.graph
    try:
        options = header_backing_options(header.backing_file, header.backing_format,
                                         node.children["file"].exact_filename(),
                                         node._probe,  # type: ignore[attr-defined]
                                         graph.personality)
        probed = options.pop(_PROBED, False)
        if options["driver"] in _FORMATS and "file" not in options:
            # The format node is named before its own open finds no file child.
            if "node-name" not in options:
                graph.skip_generated_names(1)
            raise QMPError('A block device must be specified for "file"')
        node.opened_backing_from_header = True  # type: ignore[attr-defined]
        backing = graph._open_tree(options, inline_child=True)
    except QMPError as exc:
        raise QMPError(f"Could not open backing file: {exc.desc}") from None
    backing.probed = probed  # type: ignore[attr-defined]  # QEMU's bs->probed
    return backing


# Formats whose open needs a file child; a marker key for a probed format.
_FORMATS = ("raw", "qcow2")
_PROBED = "qmpjobd-probed"


def header_backing_options(name: str, fmt: str | None, overlay_file: str | None,
                           probe: "Callable[[str], str]", who: "Personality") -> dict:
    """The options QEMU opens a header-named backing file with: ``json:{...}``
    names are parsed into options (the header's format wins over their driver),
    ``file:PATH`` and ``null-co://`` go to that protocol (a ``file:`` path is
    taken as it is, relative to the daemon's directory), anything else is a
    path next to the overlay. Without a format the file is probed. QMPError with
    QEMU's message for a name that cannot be opened (JSON errors worded as the
    personality ``who``'s JSON parser words them)."""
    if name.startswith("json:"):
        options = _json_options(name[len("json:"):], who)
        if fmt is not None:
            options["driver"] = fmt
        elif "driver" not in options:
            file = options.get("file")
            path = file.get("filename") if isinstance(file, dict) else None
            options["driver"] = probe(path) if isinstance(path, str) else "raw"
            options[_PROBED] = True
    else:
        protocol_child = _protocol_options(name) if path_has_protocol(name) else None
        if protocol_child is None:
            protocol_child = {"driver": "file",
                              "filename": full_backing_filename(name, overlay_file)}
        path = protocol_child.get("filename")
        driver = fmt or (probe(path) if isinstance(path, str) else "raw")
        options = {"driver": driver, "file": protocol_child}
        if fmt is None:
            options[_PROBED] = True
    options.setdefault("read-only", True)
    return options


def _protocol_options(name: str) -> dict:
    protocol = name.partition(":")[0]
    if protocol not in _PROTOCOLS:
        raise QMPError(f"Unknown protocol '{protocol}'")
    if protocol == "file":
        return {"driver": "file", "filename": name[len("file:"):]}
    if name != f"{protocol}://":
        raise QMPError(f"The only allowed filename for this driver is '{protocol}://'")
    return {"driver": protocol}


def _json_options(text: str, who: "Personality") -> dict:
    """parse_json_filename: a JSON object, nested or with dotted keys (both
    become nested options)."""
    from qmpjobd.wire.dialect import new_stream_parser, wire_dialect
    from qmpjobd.wire.lexer import ParsedValue, StreamParser, _parse_tokens

    parser = new_stream_parser(wire_dialect(who), fast_path=False)
    results = parser.feed(text.encode() + b" ")
    if not results and type(parser) is StreamParser and parser._kinds:
        # QEMU flushes at the end of the text: the parser sees what is there.
        try:
            results = [ParsedValue(_parse_tokens(parser._kinds, parser._texts))]
        except Exception as exc:  # _JSONSyntaxError
            raise QMPError("Could not parse the JSON options: "
                           f"{getattr(exc, 'desc', 'JSON parse error')}") from None
    if not results:
        raise QMPError("Could not parse the JSON options: JSON parse error, expecting value")
    first = results[0]
    if not isinstance(first, ParsedValue):
        raise QMPError(f"Could not parse the JSON options: {first.desc}")
    if not isinstance(first.value, dict):
        raise QMPError("Invalid JSON object given")
    return _crumple(first.value)


def _crumple(options: dict) -> dict:
    """Dotted keys ("file.filename") into nested dicts, nested dicts kept."""
    nested: dict = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = _crumple(value)
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})
            if isinstance(nested[head], dict):
                nested[head] = {**nested[head], **_crumple({rest: value})}
        elif isinstance(value, dict) and isinstance(nested.get(key), dict):
            nested[key] = {**nested[key], **value}
        else:
            nested[key] = value
    return nested
