"""libvirt's chain flows of examples/libvirt_chain_flows.py (external snapshot,
blockcommit inactive/active pivot/active abort, blockpull) give the same step lines
and the same images on qmpjobd as on qemu-storage-daemon, in every personality."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.daemons import REPO, DaemonProcess
from tests.support.oracles import SUPPORTED_VERSIONS


def load_example(name: str):
    """Load examples/<name>.py by path (examples/ is not a package; the examples
    import each other, so their directory goes on sys.path)."""
    if str(REPO / "examples") not in sys.path:
        sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flows = load_example("libvirt_chain_flows")


def flow_outcome(module, kind: str, version: str, flow: str, workdir: str) -> list[str]:
    with DaemonProcess(kind, version=version) as daemon:
        lines = module.run(daemon.sockets[0], flow, workdir)
    # Paths differ between the two runs; nothing else may.
    return [line.replace(workdir, "<workdir>") for line in lines]


IMAGE_FORMATS = {".qcow2": "qcow2", ".raw": "raw"}


def images_in(workdir: str) -> list[str]:
    return sorted(path.name for path in Path(workdir).iterdir() if path.suffix in IMAGE_FORMATS)


def assert_same_images(expected_dir: str, actual_dir: str) -> None:
    """Every image of the qmpjobd run holds the guest content qsd's run holds."""
    names = images_in(expected_dir)
    assert images_in(actual_dir) == names
    for name in names:
        image_format = IMAGE_FORMATS[Path(name).suffix]
        compare = subprocess.run(
            [flows.QEMU_IMG, "compare", "-f", image_format, "-F", image_format,
             str(Path(expected_dir) / name), str(Path(actual_dir) / name)],
            capture_output=True, text=True)
        assert compare.returncode == 0, f"{name}: {compare.stdout}{compare.stderr}"


def assert_flow_matches(module, version: str, flow: str) -> None:
    with tempfile.TemporaryDirectory() as qsd_dir, tempfile.TemporaryDirectory() as ours_dir:
        # Both daemons play at once (own directories, own sockets): the flows mostly wait.
        with ThreadPoolExecutor(max_workers=1) as pool:
            oracle = pool.submit(flow_outcome, module, "qsd", version, flow, qsd_dir)
            actual = flow_outcome(module, "qmpjobd", version, flow, ours_dir)
            expected = oracle.result()
        assert actual == expected
        assert expected and not any(line.startswith("error:") for line in expected), expected
        assert_same_images(qsd_dir, ours_dir)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("flow", flows.FLOWS)
def test_chain_flow_same_on_qmpjobd_and_qemu(flow, version):
    assert_flow_matches(flows, version, flow)
