"""What the block layer prints on stderr, worded as the impersonated release words it.

qemu-storage-daemon reports some conditions only on its stderr (a user running it
in a terminal sees them; the QMP client does not). qmpjobd prints the same lines
with the same text, so a log scraper or a person comparing the two sees no
difference. 11.1 puts the program name in front of every such line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from qmpjobd.block.personality import BACKUP_WARNING_REWORDED, STDERR_PROGRAM_PREFIX
from qmpjobd.versions import Personality

PROGRAM_PREFIX = "qemu-storage-daemon: "


def report(who: Personality, message: str, stream: TextIO | None = None) -> None:
    """One line on stderr (QEMU's error_report), prefixed as the release does."""
    prefix = PROGRAM_PREFIX if who.has(STDERR_PROGRAM_PREFIX) else ""
    out = stream if stream is not None else sys.stderr
    out.write(f"{prefix}{message}\n")
    out.flush()


def warn(who: Personality, message: str, stream: TextIO | None = None) -> None:
    """QEMU's warn_report: ``warning: `` and the message."""
    report(who, f"warning: {message}", stream)


def backup_block_size_warning(who: Personality, cluster_size: int) -> str:
    """The text a backup prints when its target cannot say its block size."""
    if who.has(BACKUP_WARNING_REWORDED):
        size, limit = "The (default) block size", "exceeds this value"
    else:
        size, limit = "The default block size", "exceeds this default"
    return ("The target block device doesn't provide information about the block size "
            f"and it doesn't have a backing file. {size} of {cluster_size} bytes is "
            f"used. If the actual block size of the target {limit}, the backup may be "
            "unusable")
