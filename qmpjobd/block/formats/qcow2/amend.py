"""``x-blockdev-amend`` for qcow2: the ``amend`` job (JOB_STATUS_CHANGE only).

QEMU's schema lets qcow2 amend only its ``encrypt`` member (LUKS keyslots). As
qmpjobd opens no encrypted image, an amend without ``encrypt`` has nothing to do
and succeeds, and one with it fails the job with QEMU's text for an unencrypted
image. Progress is 0/1 while running and 1/1 afterwards, and the job is never
dismissed automatically, as QEMU's blockdev_amend_run does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qmpjobd.errors import QMPError
from qmpjobd.job.job import Job

if TYPE_CHECKING:  # pragma: no cover
    from qmpjobd.job.manager import JobManager


class AmendJob(Job):
    __slots__ = ("node", "options", "force")

    job_type = "amend"

    def __init__(self, manager: "JobManager", node: Any, job_id: str, options: dict,
                 force: bool) -> None:
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options
        self.force = force
        # blockdev_amend keeps a reference to the node until the job is freed
        # (so the node stays, also once the job concluded).
        node.holders.append(self)

    def release_run_state(self) -> None:
        super().release_run_state()
        del self.options

    def on_free(self) -> None:
        self.node.holders.remove(self)

    async def run(self) -> int:
        self.progress_set_remaining(1)
        try:
            amend_qcow2(self.node, self.options)
        finally:
            self.progress_update(1)
        return 0


def amend_qcow2(node: Any, options: dict) -> None:
    """qcow2_co_amend: only ``encrypt`` can change, and only on an encrypted image."""
    image = getattr(node, "image", None)
    if "encrypt" in options and (image is None or not image.header.crypt_method):
        raise QMPError("image is not encrypted, can't amend")
