"""``commit_top``: the implicit filter an inactive block-commit puts above ``top``.

Not available to blockdev-add (QEMU does not list it in BlockdevDriver). It takes
over ``top``'s parents (so the overlay's ``backing`` child becomes the filter while
the job runs), is read-only, has one child ``backing`` (``top``) and shows its
child's filename whether or not the user named it (QEMU's
bdrv_commit_top_refresh_filename). The job's prepare step replaces it by ``base``
for every parent; abort replaces it by ``top`` again.
"""

from __future__ import annotations

from qmpjobd.block.drivers.mirror_top import BackingFilterNode


class CommitTopNode(BackingFilterNode):
    driver = "commit_top"

    def open(self) -> None:
        self.read_only = True
        self.size = self.children["backing"].size

    def full_open_options(self) -> dict:
        # Implicit or not, QEMU describes the filter by its child.
        return self.children["backing"].full_open_options()
