"""query-qmp-schema: shape and masking as QEMU 7.2 builds them.

The captured qsd 7.2 introspection (shared/reference) is the reference: for
every command and event we share with qsd, the structure reachable from it,
with the masked names resolved on both sides, must be identical.
"""
import json
from pathlib import Path

import pytest

from qmpjobd.qapi import Schema

# query-qmp-schema of qemu-storage-daemon 7.2, captured from the daemon (interface data).
QSD = Path(__file__).resolve().parents[1] / "data/qsd-7.2-schema.json"
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
EVENTS = ["JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
          "BLOCK_JOB_ERROR", "BLOCK_JOB_READY", "BLOCK_JOB_PENDING",
          "BLOCK_WRITE_THRESHOLD"]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


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


def test_exactly_the_implemented_commands_and_events(ours):
    assert [e["name"] for e in ours if e["meta-type"] == "command"] == [
        n for n in _qsd_order() if n in REQUIRED]
    assert {e["name"] for e in ours if e["meta-type"] == "event"} == set(EVENTS)


def _qsd_order() -> list[str]:
    return [e["name"] for e in json.loads(QSD.read_text()) if e["meta-type"] == "command"]


@pytest.mark.parametrize("entity", REQUIRED + EVENTS)
def test_structure_equals_qsd(ours, entity):
    qsd = json.loads(QSD.read_text())
    assert unmask(ours, entity) == unmask(qsd, entity)


def test_entities_first_then_types_in_first_use_order(ours):
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


def test_entry_shapes(ours):
    by_name = {e["name"]: e for e in ours}
    quit_ = by_name["quit"]
    assert quit_ == {"name": "quit", "ret-type": "0", "arg-type": "0", "meta-type": "command"}
    assert by_name["0"] == {"name": "0", "members": [], "meta-type": "object"}
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
    from qmpjobd.qapi.introspect import introspect
    plain = {e["name"]: e for e in introspect(schema.model, unmask=True)}
    add = plain["blockdev-add"]
    assert add["arg-type"] == "BlockdevOptions"
    assert plain["BlockdevOptions"]["tag"] == "driver"
    assert plain["query-qmp-schema"]["ret-type"] == "[SchemaInfo]"
    assert plain["transaction"]["arg-type"] == "q_obj_transaction-arg"
