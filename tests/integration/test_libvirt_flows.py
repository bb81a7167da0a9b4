"""The libvirt-style flows of examples/libvirt_flows.py give the same outcome on
qmpjobd as on qemu-storage-daemon 7.2 (management-and-peers.md section 2.6)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

from tests.support.daemons import REPO, DaemonProcess

spec = importlib.util.spec_from_file_location("libvirt_flows", REPO / "examples" / "libvirt_flows.py")
flows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flows)


def outcome(kind: str, flow: str) -> list[str]:
    with DaemonProcess(kind) as daemon, tempfile.TemporaryDirectory() as workdir:
        lines = flows.run(daemon.sockets[0], flow, workdir)
    # Paths differ between the two runs; nothing else may.
    return [line.replace(workdir, "<workdir>") for line in lines]


@pytest.mark.parametrize("flow", flows.FLOWS)
def test_flow_same_on_qmpjobd_and_qemu(flow):
    expected = outcome("qsd", flow)
    actual = outcome("qmpjobd", flow)
    assert actual == expected
    assert expected, "the flow printed nothing"
