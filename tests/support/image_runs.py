"""Playing one image scenario on qemu-storage-daemon and on qmpjobd, each on its
own copy of the same starting images."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable


def run_on_copies(tmp_path: Path, version: str, make_images: Callable[[Path], None],
                  run: Callable[[str, str, Path], Any]) -> tuple[dict[str, Path], Any, Any]:
    """Build the images once (``make_images(dir)``), copy them for each daemon and
    play ``run(kind, version, dir)`` on qsd then qmpjobd: (dirs, qsd's, qmpjobd's)."""
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    make_images(pristine)
    dirs = {}
    for kind in ("qsd", "qmpjobd"):
        dirs[kind] = tmp_path / kind
        shutil.copytree(pristine, dirs[kind])
    expected = run("qsd", version, dirs["qsd"])
    actual = run("qmpjobd", version, dirs["qmpjobd"])
    return dirs, expected, actual
