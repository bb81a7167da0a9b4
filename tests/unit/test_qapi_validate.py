"""Argument validation: QEMU's exact messages, in QEMU's visit order.

Every expected message below was observed from qemu-storage-daemon 7.2.
"""
import pytest

from qmpjobd.errors import QMPError
from qmpjobd.qapi import Schema

BIG = 2**63
CASES = [
    # missing members, dotted and indexed paths
    ("job-dismiss", {}, "Parameter 'id' is missing"),
    ("job-dismiss", {"extra": 1}, "Parameter 'id' is missing"),
    ("blockdev-backup", {}, "Parameter 'device' is missing"),
    ("blockdev-backup", {"device": "d0", "target": "t0"}, "Parameter 'sync' is missing"),
    ("block-job-set-speed", {"device": "j0"}, "Parameter 'speed' is missing"),
    ("blockdev-add", {"node-name": "n0"}, "Parameter 'driver' is missing"),
    ("transaction", {"actions": [{"type": "blockdev-backup",
                                  "data": {"device": "a", "target": "b"}}]},
     "Parameter 'actions[0].data.sync' is missing"),
    ("transaction", {"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    ("transaction", {"actions": [{"type": "abort"}]}, "Parameter 'actions[0].data' is missing"),
    # JSON type errors
    ("job-dismiss", {"id": 5}, "Invalid parameter type for 'id', expected: string"),
    ("block-job-cancel", {"device": "j0", "force": "yes"},
     "Invalid parameter type for 'force', expected: boolean"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ("qmp_capabilities", {"enable": None}, "Invalid parameter type for 'enable', expected: array"),
    ("transaction", {"actions": [5]}, "Invalid parameter type for 'actions[0]', expected: object"),
    ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("blockdev-add", {"driver": "null-co", "cache": {"direct": 1}},
     "Invalid parameter type for 'cache.direct', expected: boolean"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "take-child-perms": [5]},
     "Invalid parameter type for 'take-child-perms[0]', expected: string"),
    ("blockdev-add", {"driver": "quorum", "children": ["a", {"driver": "null-co", "size": "x"}],
                      "vote-threshold": 1},
     "Invalid parameter type for 'children[1].size', expected: integer"),
    # int64
    *[("block-job-set-speed", {"device": "j0", "speed": v},
       "Invalid parameter type for 'speed', expected: integer")
      for v in ("100", 1.5, 1e3, True, None, BIG)],
    ("blockdev-add", {"driver": "null-co", "size": 2**64 - 1},
     "Invalid parameter type for 'size', expected: integer"),
    ("transaction", {"actions": [{"type": "blockdev-backup", "data": {
        "device": "a", "target": "b", "sync": "full", "x-perf": {"max-chunk": 1.5}}}]},
     "Invalid parameter type for 'actions[0].data.x-perf.max-chunk', expected: integer"),
    # uint64 / size (full path) and narrow integers (member name only)
    ("blockdev-add", {"driver": "null-co", "latency-ns": "a"}, "Parameter 'latency-ns' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x", "size": 1.5}},
     "Parameter 'options.size' expects uint64"),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                     "size": 2**64}},
     "Parameter 'options.size' expects uint64"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "a", "name": "b", "granularity": -1}}]},
     "Parameter 'granularity' expects uint32_t"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "a", "name": "b", "granularity": 1.5}}]},
     "Parameter 'actions[0].data.granularity' expects uint64"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "a", "port": "1", "to": -1}},
     "Parameter 'to' expects uint16_t"),
    ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "a", "port": "1", "to": "x"}},
     "Parameter 'server.to' expects uint64"),
    ("blockdev-add", {"driver": "blkdebug", "image": "x", "max-transfer": 2**31},
     "Parameter 'max-transfer' expects int32_t"),
    # enums: member name only, 'null' inside lists
    ("blockdev-backup", {"device": "d0", "target": "t0", "sync": "bogus"},
     "Parameter 'sync' does not accept value 'bogus'"),
    ("blockdev-backup", {"device": "d0", "target": "t0", "sync": 3},
     "Invalid parameter type for 'sync', expected: string"),
    ("blockdev-backup", {"device": "d0", "target": "t0", "sync": "full", "on-source-error": "nope"},
     "Parameter 'on-source-error' does not accept value 'nope'"),
    ("blockdev-add", {"driver": "bogus"}, "Parameter 'driver' does not accept value 'bogus'"),
    ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
    ("qmp_capabilities", {"enable": ["oob", "foo"]}, "Parameter 'null' does not accept value 'foo'"),
    ("transaction", {"actions": [{"type": "bogus", "data": {}}]},
     "Parameter 'type' does not accept value 'bogus'"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": {"template": "bogus"}},
     "Parameter 'template' does not accept value 'bogus'"),
    # alternates: member name only ('null' in lists), QEMU's type name
    ("blockdev-add", {"driver": "qcow2", "file": 5},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": {"driver": "qcow2", "file": 5}},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": 5},
     "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ("blockdev-add", {"driver": "quorum", "children": [5], "vote-threshold": 1},
     "Invalid parameter type for 'null', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": 5},
     "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-merge",
                                  "data": {"node": "a", "target": "b", "bitmaps": [5]}}]},
     "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    # unexpected members: after declared ones, GLib hash order picks the name
    ("query-version", {"a": 1}, "Parameter 'a' is unexpected"),
    ("query-jobs", {"x": 1}, "Parameter 'x' is unexpected"),
    ("query-jobs", {"a": 1, "b": 2, "c": 3}, "Parameter 'b' is unexpected"),
    ("query-jobs", {"x": 1, "y": 2}, "Parameter 'y' is unexpected"),
    ("qmp_capabilities", {"foo": 1}, "Parameter 'foo' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "x": 1, "y": 2}, "Parameter 'y' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "x": 1, "y": 2, "z": 3, "w": 4},
     "Parameter 'z' is unexpected"),
    ("blockdev-add", {"driver": "null-co", "cache": {"direct": True, "zz": 1}},
     "Parameter 'cache.zz' is unexpected"),
    ("blockdev-add", {"driver": "qcow2", "file": {"driver": "null-co", "bogus": 1}},
     "Parameter 'file.bogus' is unexpected"),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]},
     "Parameter 'actions[0].data.x' is unexpected"),
    ("transaction", {"actions": [{"type": "abort", "data": {}, "x": 1}],
                     "properties": {"completion-mode": "bogus"}},
     "Parameter 'actions[0].x' is unexpected"),
    ("query-named-block-nodes", {"flat": True, "node-name": 1, "b": 1}, "Parameter 'b' is unexpected"),
    ("blockdev-del", {"node-name": "zz", "b": 1, "zz": 1, "a": 1}, "Parameter 'zz' is unexpected"),
]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.mark.parametrize("command,args,message", CASES)
def test_qemu_message(schema, command, args, message):
    with pytest.raises(QMPError) as info:
        schema.validate(command, args)
    assert info.value.desc == message
    assert info.value.error_class == "GenericError"


@pytest.mark.parametrize("command,args", [
    ("qmp_capabilities", {"enable": ["oob", "oob"]}),
    ("qmp_capabilities", {}),
    ("transaction", {"actions": []}),
    ("block-job-set-speed", {"device": "j0", "speed": -1}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1048576, "read-zeroes": True}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "/x"},
                      "backing": None, "overlap-check": "all"}),
    ("blockdev-backup", {"job-id": "j0", "device": "a", "target": "b", "sync": "full",
                         "x-perf": {"use-copy-range": False, "max-workers": 4}}),
])
def test_valid_arguments_pass(schema, command, args):
    assert schema.validate(command, args) == args


def test_uint64_negative_values_wrap_without_touching_input(schema):
    args = {"driver": "null-co", "latency-ns": -1}
    out = schema.validate("blockdev-add", args)
    assert out["latency-ns"] == 2**64 - 1
    assert args["latency-ns"] == -1


def test_unchanged_arguments_are_returned_as_is(schema):
    args = {"device": "j0", "speed": 10}
    assert schema.validate("block-job-set-speed", args) is args


def test_validate_type_with_path_prefix(schema):
    with pytest.raises(QMPError) as info:
        schema.validate_type("BlockdevCreateOptions", {"driver": "file", "filename": "x"}, "options")
    assert info.value.desc == "Parameter 'options.size' is missing"
