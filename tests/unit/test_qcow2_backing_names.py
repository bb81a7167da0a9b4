"""How a header's backing file name becomes open options, and the qcow2 runtime
options QEMU refuses after reading the header (messages checked against
qemu-storage-daemon 7.2, 10.0 and 11.1 in block_qcow2_chains_matrix.qmp)."""

from __future__ import annotations

import pytest

from qmpjobd.block.formats.qcow2.backing import (
    full_backing_filename,
    header_backing_options,
    path_has_protocol,
)
from qmpjobd.block.formats.qcow2.header import Header, check_runtime_options
from qmpjobd.errors import QMPError
from qmpjobd.versions import personality

V72, V111 = personality("7.2"), personality("11.1")


def _never_probe(path: str) -> str:
    raise AssertionError(f"probed {path}")


def test_protocol_is_a_colon_before_any_slash():
    assert path_has_protocol("file:b.qcow2")
    assert path_has_protocol("json:{\"a\": \"/x\"}")
    assert not path_has_protocol("./a:b")
    assert not path_has_protocol("b.qcow2")


def test_full_backing_filename_keeps_protocols_and_absolute_paths():
    assert full_backing_filename("b.qcow2", "/d/t.qcow2") == "/d/b.qcow2"
    assert full_backing_filename("../e/b.qcow2", "/d/t.qcow2") == "/d/../e/b.qcow2"
    assert full_backing_filename("b.qcow2", "t.qcow2") == "b.qcow2"
    assert full_backing_filename("/x/b.qcow2", "/d/t.qcow2") == "/x/b.qcow2"
    assert full_backing_filename("file:b.qcow2", "/d/t.qcow2") == "file:b.qcow2"


def test_json_name_dotted_keys_and_header_format_wins():
    options = header_backing_options(
        'json:{"driver":"raw","file.driver":"file","file.filename":"b.qcow2"}',
        "qcow2", "/d/t.qcow2", _never_probe, V72)
    assert options == {"driver": "qcow2", "file": {"driver": "file", "filename": "b.qcow2"},
                       "read-only": True}


def test_file_protocol_is_not_taken_next_to_the_overlay():
    options = header_backing_options("file:b.qcow2", "qcow2", "/d/t.qcow2", _never_probe, V72)
    assert options["file"] == {"driver": "file", "filename": "b.qcow2"}


@pytest.mark.parametrize("name, message", [
    ("foo:bar", "Unknown protocol 'foo'"),
    ("null-co://x", "The only allowed filename for this driver is 'null-co://'"),
    ("json:[1]", "Invalid JSON object given"),
    ("json:{bad", "Could not parse the JSON options: JSON parse error, invalid keyword 'bad'"),
])
def test_unopenable_names(name, message):
    with pytest.raises(QMPError) as err:
        header_backing_options(name, "raw", "t.qcow2", _never_probe, V72)
    assert err.value.desc == message


def test_json_parse_errors_follow_the_personality_parser():
    with pytest.raises(QMPError) as err:
        header_backing_options("json:{bad", "raw", "t.qcow2", _never_probe, V111)
    assert err.value.desc == ("Could not parse the JSON options: 1:2: JSON parse error, "
                              "expecting key")


def test_a_name_without_format_is_probed():
    options = header_backing_options("r.raw", None, "t.qcow2", lambda path: "raw", V72)
    assert options["driver"] == "raw" and options["qmpjobd-probed"] is True


@pytest.mark.parametrize("options, message", [
    ({"cache-size": 1 << 20, "l2-cache-size": 1 << 20, "refcount-cache-size": 65536},
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
    ({"cache-size": 1 << 20, "l2-cache-size": 2 << 20}, "l2-cache-size may not exceed cache-size"),
    ({"cache-size": 65536, "refcount-cache-size": 131072},
     "refcount-cache-size may not exceed cache-size"),
    ({"l2-cache-entry-size": 1000},
     "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
    ({"cache-clean-interval": -1}, "Cache clean interval too big"),
    ({"cache-clean-interval": 1 << 32}, "Cache clean interval too big"),
    ({"refcount-cache-size": -5},
     "Parameter 'refcount-cache-size' expects a non-negative number below 2^64"),
])
def test_refused_runtime_options(options, message):
    with pytest.raises(QMPError) as err:
        check_runtime_options(Header(size=1 << 20), options, sizes_reworded=False)
    assert err.value.desc == message


def test_negative_size_reworded_and_v2_checks():
    with pytest.raises(QMPError) as err:
        check_runtime_options(Header(size=1 << 20), {"l2-cache-size": -1}, sizes_reworded=True)
    assert err.value.desc == "Value '-1' is out of range for parameter 'l2-cache-size'"
    with pytest.raises(QMPError) as err:
        check_runtime_options(Header(version=2, size=1 << 20), {"discard-no-unref": True},
                              sizes_reworded=True)
    assert err.value.desc == "discard-no-unref is only supported since qcow2 version 3"
    check_runtime_options(Header(size=1 << 20), {"cache-size": 1, "l2-cache-size": 1,
                                                 "cache-clean-interval": (1 << 32) - 1},
                          sizes_reworded=True)
