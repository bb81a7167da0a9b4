"""What inactivating and re-activating a qcow2 node does to its image.

Measured on qemu-storage-daemon 10.0 and 11.1 (``blockdev-set-active``):

* Inactivation stores the persistent dirty bitmaps (their ``in-use`` flag cleared in
  the file) and releases them from the node, writes the cached L2 tables and
  refcount blocks, flushes the file and leaves the header clean. With the
  permissions the node then drops, another process (``qemu-img info``/``check``
  without ``-U``, ``qemu-io`` writing) may open and change the image.
* Activation forgets everything the node knew about the image and reads it again
  from the file: header, L1 and refcount tables, snapshot table, and the stored
  bitmaps, which become the node's again and are marked ``in-use`` once more.
  What another process wrote meanwhile (data, bitmap bits) is then visible.

qmpjobd keeps its refcounts exact and never sets the dirty bit, so "leaving the
header clean" needs no header write here.
"""

from __future__ import annotations

from typing import Any

from qmpjobd.block.formats.qcow2 import bitmaps as qcow2_bitmaps
from qmpjobd.errors import QMPError


def _stored_bitmaps(node: Any) -> list[Any]:
    """The bitmaps a store writes (and an inactivation then releases)."""
    return [b for b in node.dirty_bitmaps
            if qcow2_bitmaps._storable(b) and not b.readonly]


def inactivate_image(node: Any) -> None:
    """qcow2's inactivate hook: bitmaps to the file, caches to the file, flush."""
    from qmpjobd.block.drivers.qcow2 import write_back

    image = node.image
    if image is None or image.unusable:
        return
    stored = _stored_bitmaps(node)
    reason = qcow2_bitmaps.store_persistent_bitmaps(node)
    if reason is None:
        for bitmap in stored:
            node.remove_dirty_bitmap(bitmap)
    else:
        qcow2_bitmaps.report_lost(node, reason)
    try:
        write_back(node, image, flush=True, mark_clean=True)
    except OSError:
        pass        # as at close: QEMU reports a failed flush and goes on


def activate_image(node: Any) -> None:
    """qcow2's invalidate-cache hook: open the image again from the file."""
    old = node.image
    if old is None or old.unusable:
        return
    try:
        image = node.read_image(old.read_only, old.options)
    except (QMPError, OSError) as exc:
        # QEMU drops the driver of a node it could not open again.
        old.unusable = True
        reason = exc.desc if isinstance(exc, QMPError) else exc.strerror
        raise QMPError(f"Could not reopen qcow2 layer: {reason}") from None
    node.image = image
    node.size = image.size
    qcow2_bitmaps.on_open(node)
    from qmpjobd.block.formats.qcow2.repair import repair_if_dirty
    repair_if_dirty(node)
