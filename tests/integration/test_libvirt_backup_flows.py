"""libvirt's backup flows of examples/libvirt_backup_flows.py (push-mode full and
incremental backup with checkpoints, pull-mode full and incremental backup read by
NBD clients) give the same step lines, the same NBD client view and the same images
on qmpjobd as on qemu-storage-daemon, in every personality."""

from __future__ import annotations

import pytest

from tests.integration.test_libvirt_chain_flows import assert_flow_matches, load_example
from tests.support.oracles import SUPPORTED_VERSIONS

flows = load_example("libvirt_backup_flows")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
@pytest.mark.parametrize("flow", flows.FLOWS)
def test_backup_flow_same_on_qmpjobd_and_qemu(flow, version):
    assert_flow_matches(flows, version, flow)
