"""query-qmp-schema and query-commands of each QEMU personality, against the
captures of the real qemu-storage-daemon of that version.

The captures (tests/data/qsd-V-schema.json and qsd-V-commands.json, the
return values of the real daemons, in wire order) are the reference.  For
every command and event a version's schema defines, the structure reachable
from it, with the masked names resolved on both sides, must be identical; the
schema must define no command or event the real daemon lacks; and both lists
must come in the real daemon's order.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmpjobd.commands import load_all
from qmpjobd.qapi import Schema
from qmpjobd.qapi.introspect import introspect
from qmpjobd.versions import KNOWN_VERSIONS

DATA = Path(__file__).resolve().parents[1] / "data"
# The commands README.md lists as implemented (every version has them).
REQUIRED = [
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema", "quit",
    "job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize", "job-dismiss",
    "query-jobs", "block-job-pause", "block-job-resume", "block-job-cancel",
    "block-job-complete", "block-job-finalize", "block-job-dismiss", "block-job-set-speed",
    "query-block-jobs", "query-block", "query-blockstats", "block-set-write-threshold",
    "query-block-exports", "query-chardev", "query-chardev-backends", "blockdev-add", "blockdev-del", "query-named-block-nodes",
    "blockdev-backup", "drive-backup", "blockdev-mirror", "drive-mirror", "blockdev-create",
    "transaction",
]
EVENTS = ["JOB_STATUS_CHANGE", "BLOCK_IMAGE_CORRUPTED", "BLOCK_IO_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
          "BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_PENDING",
          "BLOCK_WRITE_THRESHOLD", "BLOCK_EXPORT_DELETED",
          # Listed by every daemon, never sent by a storage daemon without
          # quorum nodes or virtio-serial ports.
          "QUORUM_FAILURE", "QUORUM_REPORT_BAD", "VSERPORT_CHANGE"]
_SCHEMAS: dict[str, Schema] = {}


def schema_of(version: str) -> Schema:
    if version not in _SCHEMAS:
        _SCHEMAS[version] = Schema.load(version=version)
    return _SCHEMAS[version]


def capture(version: str, what: str) -> list[dict]:
    return json.loads((DATA / f"qsd-{version}-{what}.json").read_text())


def _entities(version: str) -> list[tuple[str, str]]:
    return [(version, e.name) for e in schema_of(version).model.entities]


def _names(entries: list[dict], meta: str) -> list[str]:
    return [e["name"] for e in entries if e["meta-type"] == meta]


@pytest.fixture(scope="module", params=KNOWN_VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def schema(version) -> Schema:
    return schema_of(version)


@pytest.fixture(scope="module")
def ours(schema) -> list[dict]:
    return schema.introspect()


def unmask(entries: list[dict], root: str) -> object:
    """Structure reachable from *root* with every type reference resolved
    (masked names vanish; a recursive reference becomes a marker)."""
    by_name = {e["name"]: e for e in entries}

    def walk(name: str, stack: tuple) -> object:
        if name in stack:
            return ("recursion", stack.index(name))
        e, st = by_name[name], stack + (name,)
        feats = tuple(e.get("features", []))
        mt = e["meta-type"]
        if mt == "builtin":
            return ("builtin", name, e["json-type"])
        if mt == "enum":
            return ("enum", tuple((m["name"], tuple(m.get("features", []))) for m in e["members"]),
                    tuple(e["values"]), feats)
        if mt == "array":
            return ("array", walk(e["element-type"], st))
        if mt == "alternate":
            return ("alternate", tuple(walk(m["type"], st) for m in e["members"]), feats)
        if mt == "object":
            members = tuple((m["name"], walk(m["type"], st), "default" in m, m.get("default"),
                             tuple(m.get("features", []))) for m in e["members"])
            variants = tuple((v["case"], walk(v["type"], st)) for v in e.get("variants", []))
            return ("object", members, e.get("tag"), variants, feats)
        if mt == "command":
            return ("command", walk(e["arg-type"], st), walk(e["ret-type"], st),
                    e.get("allow-oob", False), feats)
        assert mt == "event"
        return ("event", walk(e["arg-type"], st), feats)

    return walk(root, ())



@pytest.mark.parametrize("version,entity", [p for v in KNOWN_VERSIONS for p in _entities(v)])
def test_structure_equals_qsd(version, entity):
    ours = schema_of(version).introspect()
    assert unmask(ours, entity) == unmask(capture(version, "schema"), entity)


def test_no_command_or_event_the_daemon_lacks(version, ours):
    theirs = capture(version, "schema")
    assert set(_names(ours, "command")) <= set(_names(theirs, "command"))
    assert set(_names(ours, "event")) <= set(_names(theirs, "event"))
    assert set(_names(ours, "event")) == set(EVENTS)
    assert set(REQUIRED) <= set(_names(ours, "command"))


def test_entities_come_in_the_daemons_order(version, ours):
    theirs = capture(version, "schema")
    mine = _names(ours, "command")
    assert mine == [n for n in _names(theirs, "command") if n in mine]
    # query-qmp-schema and query-commands of one daemon list commands in
    # opposite orders; ours must too
    listed = [c["name"] for c in capture(version, "commands")]
    assert listed == list(reversed(_names(theirs, "command")))


def test_query_commands_order_is_the_daemons(version, schema):
    """Through the real handler: the implemented commands, in the order of
    the real daemon's query-commands."""
    handlers = load_all()
    ctx = SimpleNamespace(daemon=SimpleNamespace(schema=schema))
    listed = [c["name"] for c in handlers["query-commands"](ctx, {})]
    theirs = [c["name"] for c in capture(version, "commands")]
    assert listed == [n for n in theirs if n in schema.commands and n in handlers]
    assert set(REQUIRED) <= set(listed)


def test_introspection_of_implemented_commands_only(version, schema):
    """introspect(commands=...) advertises only those commands, still with
    the daemon's structure and a consistent numbering."""
    ours = schema.introspect(commands=REQUIRED)
    assert _names(ours, "command") == [n for n in _names(capture(version, "schema"), "command")
                                       if n in REQUIRED]
    assert set(_names(ours, "event")) == set(EVENTS)
    _check_numbering(ours)
    theirs = capture(version, "schema")
    for name in REQUIRED + EVENTS:
        assert unmask(ours, name) == unmask(theirs, name), name


def test_entities_first_then_types_in_first_use_order(ours):
    _check_numbering(ours)


def _check_numbering(ours: list[dict]) -> None:
    metas = [e["meta-type"] for e in ours]
    n_entities = sum(m in ("command", "event") for m in metas)
    assert all(m in ("command", "event") for m in metas[:n_entities])
    masked = [e["name"] for e in ours[n_entities:] if e["meta-type"] not in ("builtin", "array")]
    assert masked == [str(i) for i in range(len(masked))]
    # every reference points at an entry, and numbering follows first reference
    names = {e["name"] for e in ours}
    seen: list[str] = []
    for e in ours:
        for ref in _refs(e):
            assert ref in names
            inner = ref.strip("[]")      # using [X] numbers X at that moment
            if inner.isdigit() and inner not in seen:
                seen.append(inner)
    assert seen == masked


def _refs(e: dict) -> list[str]:
    out = [e[k] for k in ("arg-type", "ret-type", "element-type") if k in e]
    out += [m["type"] for m in e.get("members", []) if "type" in m]
    out += [v["type"] for v in e.get("variants", [])]
    return out


def test_entry_shapes(version, ours):
    by_name = {e["name"]: e for e in ours}
    quit_ = by_name["quit"]
    empty = quit_["arg-type"]
    assert quit_ == {"name": "quit", "ret-type": empty, "arg-type": empty, "meta-type": "command"}
    assert by_name[empty] == {"name": empty, "members": [], "meta-type": "object"}
    # the numbering of the first types follows the daemon's definition order
    theirs = {e["name"]: e for e in capture(version, "schema")}
    assert quit_ == theirs["quit"]
    assert by_name["drive-backup"]["features"] == ["deprecated"]
    builtins = {e["name"]: e["json-type"] for e in ours if e["meta-type"] == "builtin"}
    assert builtins == {"str": "string", "int": "int", "number": "number", "bool": "boolean", "null": "null",
                        "any": "value"}
    cap = by_name[by_name["qmp_capabilities"]["arg-type"]]
    assert cap["members"] == [{"name": "enable", "type": cap["members"][0]["type"],
                               "default": None}]
    assert "allow-oob" not in json.dumps([e for e in ours if e["meta-type"] == "command"])
    arrays = [e for e in ours if e["meta-type"] == "array"]
    assert all(a["name"] == "[" + a["element-type"] + "]" for a in arrays)


def test_unmasked_names_are_qemus(schema):
    plain = {e["name"]: e for e in introspect(schema.model, unmask=True)}
    add = plain["blockdev-add"]
    assert add["arg-type"] == "BlockdevOptions"
    assert plain["BlockdevOptions"]["tag"] == "driver"
    assert plain["query-qmp-schema"]["ret-type"] == "[SchemaInfo]"
    assert plain["transaction"]["arg-type"] == "q_obj_transaction-arg"
