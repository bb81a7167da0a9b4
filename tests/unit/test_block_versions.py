"""The block layer per personality: which members the node and stats queries fill
in, blockdev-set-active's rules, the driver and stderr texts. The expected values
were read off qemu-storage-daemon 7.2.22, 10.0.13 and 11.1.3 for the same
blockdev-add arguments (the socket-level comparison with the real daemons is in
tests/integration/test_block_versions.py and the block_versions_* scenarios)."""

from __future__ import annotations

import io
import pathlib

import pytest

from qmpjobd.block import personality as block_personality
from qmpjobd.block.drivers import check_module_drivers
from qmpjobd.block.query import block_stats, named_block_nodes
from qmpjobd.block.stderr import backup_block_size_warning, report, warn
from qmpjobd.commands import HANDLERS, Context, load_all
from qmpjobd.daemon import Daemon, DaemonOptions
from qmpjobd.errors import QMPError
from qmpjobd.qapi import Schema
from qmpjobd.versions import KNOWN_VERSIONS, personality

load_all()

LIMITS_NULL = {"request-alignment": 1, "max-iov": 1024, "min-mem-alignment": 512,
               "opt-mem-alignment": 4096}
LIMITS_FILE = {**LIMITS_NULL, "min-mem-alignment": 1}
ZONE_APPEND = {"zone_append_bytes", "zone_append_operations", "zone_append_total_time_ns",
               "zone_append_merged", "failed_zone_append_operations",
               "invalid_zone_append_operations"}


def daemon_for(version: str) -> Daemon:
    # Drained sections (their paused/running events) are the drain model's tests.
    return Daemon(schema=Schema.load(version=version),
                  options=DaemonOptions(drain_artefacts=False))


def run(daemon: Daemon, command: str, args: dict) -> object:
    """A handler call as the dispatcher makes it, after schema validation."""
    validated = daemon.schema.validate(command, args)
    return HANDLERS[command](Context(daemon, session=None), validated)


def nodes_by_name(daemon: Daemon, flat: bool = True) -> dict[str, dict]:
    return {info["node-name"]: info
            for info in named_block_nodes(daemon.graph, flat, daemon.personality)}


@pytest.fixture
def image(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "a.raw"
    path.write_bytes(b"\x5a" * 65536)
    return str(path)


def add_every_driver(daemon: Daemon, image: str) -> None:
    run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1048576})
    run(daemon, "blockdev-add", {"driver": "null-aio", "node-name": "na", "size": 1048576})
    run(daemon, "blockdev-add", {"driver": "file", "node-name": "f", "filename": image})
    run(daemon, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    run(daemon, "blockdev-add", {"driver": "blkdebug", "node-name": "d", "image": "n"})
    run(daemon, "blockdev-add", {"driver": "blkdebug", "node-name": "da", "align": 4096,
                                 "image": {"driver": "null-co", "node-name": "dn"}})


# --------------------------------------------------------------- query-named-block-nodes

def test_7_2_nodes_have_none_of_the_new_members(image: str) -> None:
    daemon = daemon_for("7.2")
    add_every_driver(daemon, image)
    for info in nodes_by_name(daemon, flat=False).values():
        assert "active" not in info and "children" not in info
        assert "limits" not in info["image"] and "format-specific" not in info["image"]


def test_10_0_adds_active_and_file_format_specific_only(image: str) -> None:
    daemon = daemon_for("10.0")
    add_every_driver(daemon, image)
    nodes = nodes_by_name(daemon)
    assert {name: info["active"] for name, info in nodes.items()} == dict.fromkeys(nodes, True)
    assert nodes["f"]["image"]["format-specific"] == {"type": "file", "data": {}}
    assert all("format-specific" not in info["image"] for name, info in nodes.items()
               if name != "f")
    assert all("children" not in info and "limits" not in info["image"]
               for info in nodes.values())


def test_11_1_children_and_limits_per_driver(image: str) -> None:
    daemon = daemon_for("11.1")
    add_every_driver(daemon, image)
    nodes = nodes_by_name(daemon)
    assert nodes["r"]["children"] == [{"child": "file", "node-name": "f"}]
    assert nodes["d"]["children"] == [{"child": "image", "node-name": "n"}]
    assert nodes["n"]["children"] == [] and nodes["f"]["children"] == []
    limits = {name: info["image"]["limits"] for name, info in nodes.items()}
    assert limits == {"n": LIMITS_NULL, "na": LIMITS_NULL, "f": LIMITS_FILE,
                      "r": LIMITS_FILE, "d": LIMITS_NULL, "dn": LIMITS_NULL,
                      "da": {**LIMITS_NULL, "request-alignment": 4096}}


def test_11_1_limits_in_nested_backing_image() -> None:
    daemon = daemon_for("11.1")
    run(daemon, "blockdev-add", {"driver": "blkdebug", "node-name": "d", "align": 4096,
                                 "image": {"driver": "null-co", "node-name": "n"}})
    image = nodes_by_name(daemon, flat=False)["d"]["image"]
    assert image["limits"]["request-alignment"] == 4096
    assert image["backing-image"]["limits"] == LIMITS_NULL


# --------------------------------------------------------------- query-blockstats

@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_zone_append_counters_also_in_parent(version: str, image: str) -> None:
    daemon = daemon_for(version)
    add_every_driver(daemon, image)
    stats = {entry["node-name"]: entry for entry in
             block_stats(daemon.graph, True, daemon.personality)}
    expected = version != "7.2"
    assert (ZONE_APPEND <= stats["r"]["stats"].keys()) is expected
    assert (ZONE_APPEND <= stats["r"]["parent"]["stats"].keys()) is expected
    assert all(stats["r"]["stats"][key] == 0 for key in ZONE_APPEND & stats["r"]["stats"].keys())


# --------------------------------------------------------------- active / inactive

def active_flags(daemon: Daemon) -> dict[str, bool]:
    return {name: info["active"] for name, info in nodes_by_name(daemon).items()}


def test_blockdev_add_inactive_affects_only_that_node() -> None:
    daemon = daemon_for("10.0")
    run(daemon, "blockdev-add", {"driver": "raw", "node-name": "ri", "active": False,
                                 "file": {"driver": "null-co", "node-name": "nci"}})
    assert active_flags(daemon) == {"ri": False, "nci": True}


def test_inactive_child_cannot_join_an_active_parent() -> None:
    daemon = daemon_for("10.0")
    run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "x", "active": False})
    with pytest.raises(QMPError, match="^Inactive 'x' can't be a file child of active 'rx'$"):
        run(daemon, "blockdev-add", {"driver": "raw", "node-name": "rx", "file": "x"})
    with pytest.raises(QMPError, match="^Inactive 'x' can't be a image child of active 'dx'$"):
        run(daemon, "blockdev-add", {"driver": "blkdebug", "node-name": "dx", "image": "x"})
    with pytest.raises(QMPError, match="^Inactive 'nca' can't be a file child of active 'ra'$"):
        run(daemon, "blockdev-add", {"driver": "raw", "node-name": "ra", "file": {
            "driver": "null-co", "node-name": "nca", "active": False}})
    # Nothing of the failed adds is left behind, and x has no parent.
    assert set(daemon.graph.nodes) == {"x"} and not daemon.graph.nodes["x"].parent_nodes


def test_set_active_rules() -> None:
    daemon = daemon_for("10.0")
    run(daemon, "blockdev-add", {"driver": "raw", "node-name": "r",
                                 "file": {"driver": "null-co", "node-name": "nc"}})
    run(daemon, "blockdev-add", {"driver": "raw", "node-name": "ri", "active": False,
                                 "file": {"driver": "null-co", "node-name": "nci"}})
    run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "t"})
    with pytest.raises(QMPError, match="^Failed to find node with node-name='nope'$"):
        run(daemon, "blockdev-set-active", {"node-name": "nope", "active": False})
    with pytest.raises(QMPError, match="^Node has active parent node$"):
        run(daemon, "blockdev-set-active", {"node-name": "nc", "active": False})
    run(daemon, "blockdev-set-active", {"node-name": "r", "active": False})
    run(daemon, "blockdev-set-active", {"node-name": "r", "active": False})   # again: fine
    assert active_flags(daemon) == {"t": True, "ri": False, "nci": True, "r": False,
                                    "nc": False}
    run(daemon, "blockdev-set-active", {"node-name": "nc", "active": True})
    run(daemon, "blockdev-set-active", {"active": True})
    assert all(active_flags(daemon).values())
    # Without a node name: the monitor's roots and what only they hold. nci stays
    # active: its parent ri was inactive already, so nothing recurses into it.
    run(daemon, "blockdev-set-active", {"node-name": "nci", "active": True})
    daemon.graph.nodes["ri"].active = False       # as blockdev-add active=false left it
    run(daemon, "blockdev-set-active", {"active": False})
    assert active_flags(daemon) == {"t": False, "ri": False, "nci": True, "r": False,
                                    "nc": False}


def test_blockdev_add_active_is_unknown_to_7_2() -> None:
    daemon = daemon_for("7.2")
    with pytest.raises(QMPError, match="Parameter 'active' is unexpected"):
        run(daemon, "blockdev-add", {"driver": "null-co", "node-name": "x", "active": False})


# --------------------------------------------------------------- drivers and stderr

def test_module_drivers_read_as_unknown_where_the_build_has_them() -> None:
    check_module_drivers({"driver": "io_uring", "filename": "/x"}, modules_absent=False)
    with pytest.raises(QMPError, match="^Unknown driver 'io_uring'$"):
        check_module_drivers({"driver": "io_uring", "filename": "/x"}, modules_absent=True)
    with pytest.raises(QMPError, match="^Unknown driver 'virtio-blk-vhost-user'$"):
        check_module_drivers({"driver": "raw", "file": {
            "driver": "virtio-blk-vhost-user", "path": "/x"}}, modules_absent=True)


@pytest.mark.parametrize("version, message", [
    ("7.2", "Driver 'gluster' is not supported by qmpjobd"),
    ("10.0", "Unknown driver 'gluster'"),
    ("11.1", "Parameter 'driver' does not accept value 'gluster'")])
def test_gluster_per_version(version: str, message: str) -> None:
    with pytest.raises(QMPError, match=f"^{message}$"):
        run(daemon_for(version), "blockdev-add", {
            "driver": "gluster", "node-name": "g", "volume": "v", "path": "p",
            "server": [{"type": "inet", "host": "127.0.0.1", "port": "1"}]})


@pytest.mark.parametrize("version, prefix, reworded", [
    ("7.2", "", False), ("10.0", "", True), ("11.1", "qemu-storage-daemon: ", True)])
def test_backup_warning_text(version: str, prefix: str, reworded: bool) -> None:
    who = personality(version)
    out = io.StringIO()
    warn(who, backup_block_size_warning(who, 65536), out)
    text = out.getvalue()
    assert text.startswith(prefix + "warning: The target block device doesn't provide")
    assert text.endswith("the backup may be unusable\n") and text.count("\n") == 1
    assert ("The (default) block size of 65536 bytes" in text) is reworded
    assert ("exceeds this value" in text) is reworded
    assert ("exceeds this default" in text) is not reworded


def test_report_has_no_warning_label() -> None:
    out = io.StringIO()
    report(personality("11.1"), "Failed flush", out)
    assert out.getvalue() == "qemu-storage-daemon: Failed flush\n"


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_chardev_backends_order(version: str) -> None:
    names = [entry["name"] for entry in run(daemon_for(version), "query-chardev-backends", {})]
    if version == "7.2":
        assert names[0] == "serial" and "hub" not in names and len(names) == 12
    else:
        assert names[:1] == ["hub"] and names.index("socket") < names.index("stdio")
        assert names[-2:] == ["file", "pty"] and len(names) == 13


# --------------------------------------------------------------- the table itself

def test_behaviour_table_follows_the_schema() -> None:
    """Reply members the table switches on exist exactly where the schema has them."""
    for version in KNOWN_VERSIONS:
        daemon = daemon_for(version)
        who = daemon.personality
        commands = set(daemon.schema.command_names_registration_order())
        assert ("blockdev-set-active" in commands) is who.has(block_personality.NODE_ACTIVE_FLAG)
        assert ("block-job-change" in commands) is who.has(
            block_personality.MIRROR_ACTIVELY_SYNCED)
