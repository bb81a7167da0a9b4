"""The version registry (qmpjobd.versions) and how a schema view follows it."""
import json
from pathlib import Path

import jsonschema
import pytest

from qmpjobd import __version__
from qmpjobd.errors import QMPError
from qmpjobd.qapi import SCHEMA_DEFAULT_VERSION, Schema
from qmpjobd.qapi.__main__ import main
from qmpjobd.versions import (DEFAULT_VERSION, KNOWN_VERSIONS, PERSONALITIES, RELEASES,
                              Behaviour, UnknownVersion, personality, since_symbol)

DATA = Path(__file__).resolve().parents[1] / "data"


def test_known_versions_and_default():
    assert KNOWN_VERSIONS == ("7.2", "10.0", "11.1")
    assert DEFAULT_VERSION in KNOWN_VERSIONS
    assert set(KNOWN_VERSIONS) <= set(RELEASES)
    assert list(RELEASES) == sorted(RELEASES, key=lambda r: tuple(map(int, r.split("."))))


@pytest.mark.parametrize("text", ["9.0", "10", "10.0.13", "", "latest"])
def test_unknown_version_lists_the_known_ones(text):
    with pytest.raises(UnknownVersion) as info:
        personality(text)
    assert str(info.value) == (f"unknown QEMU version {text!r}; "
                               "known versions: 7.2, 10.0, 11.1")
    with pytest.raises(UnknownVersion):
        Schema.load(version=text)


@pytest.mark.parametrize("version,triple", [("7.2", (7, 2, 0)), ("10.0", (10, 0, 0)),
                                            ("11.1", (11, 1, 0))])
def test_version_info(version, triple):
    who = personality(version)
    assert personality(who) is who
    info = who.version_info()
    assert info["qemu"] == dict(zip(("major", "minor", "micro"), triple))
    assert list(info["qemu"]) == ["major", "minor", "micro"]   # QAPI declaration order
    assert __version__ in info["package"] and "qmpjobd" in info["package"]
    assert version in info["package"]


def test_since_symbols_accumulate():
    old, mid, new = (PERSONALITIES[v].schema_conditions for v in KNOWN_VERSIONS)
    assert old == {since_symbol("7.2")}
    assert since_symbol("10.0") in mid and since_symbol("10.1") not in mid
    assert {since_symbol(r) for r in ("8.0", "9.2", "10.0", "10.2", "11.1")} <= new
    assert mid - {"CONFIG_BLKIO"} < new
    with pytest.raises(ValueError):
        since_symbol("9.3")


def test_behaviour_tables():
    reversed_start = Behaviour("a transaction starts its jobs last first", since="10.0")
    only_old = Behaviour("gone in 11.1", since="7.2", until="11.1")
    assert [personality(v).has(reversed_start) for v in KNOWN_VERSIONS] == [False, True, True]
    assert [personality(v).has(only_old) for v in KNOWN_VERSIONS] == [True, True, False]
    with pytest.raises(ValueError):
        Behaviour("typo", since="10.5")


def test_schema_default_is_one_constant():
    assert Schema.load().version == SCHEMA_DEFAULT_VERSION
    assert Schema.load().introspect() == Schema.load(version=SCHEMA_DEFAULT_VERSION).introspect()


def _messages(version: str, command: str, args: dict) -> str | None:
    try:
        Schema.load(version=version).validate(command, args)
    except QMPError as exc:
        return exc.desc
    return None


def test_validation_follows_the_version():
    """Observed on the real daemons (qemu-versions.md sections 4.5 and 6)."""
    flat = ("query-block", {"flat": True})
    assert [_messages(v, *flat) for v in KNOWN_VERSIONS] == [
        "Parameter 'flat' is unexpected", "Parameter 'flat' is unexpected", None]
    cbw = ("blockdev-backup", {"device": "a", "target": "b", "sync": "full",
                               "on-cbw-error": "break-snapshot"})
    assert [_messages(v, *cbw) for v in KNOWN_VERSIONS] == [
        "Parameter 'on-cbw-error' is unexpected", "Parameter 'on-cbw-error' is unexpected", None]
    gluster = ("blockdev-add", {"driver": "gluster", "volume": "v", "path": "p",
                                "server": [{"type": "unix", "path": "/x"}]})
    assert _messages("11.1", *gluster) == "Parameter 'driver' does not accept value 'gluster'"
    assert _messages("10.0", *gluster) is None


def test_json_schema_follows_the_version():
    def driver_names(version: str) -> list[str]:
        doc = Schema.load(version=version).json_schema()
        return doc["$defs"]["BlockdevDriver"]["enum"]

    assert "gluster" in driver_names("10.0") and "gluster" not in driver_names("11.1")
    assert "io_uring" not in driver_names("7.2") and "io_uring" in driver_names("10.0")
    assert "block-job-change" in Schema.load(version="10.0").json_schema()["properties"]
    assert "block-job-change" not in Schema.load(version="7.2").json_schema()["properties"]


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_features_of_commands_are_the_daemons(version):
    theirs = {e["name"]: e.get("features", []) for e in
              json.loads((DATA / f"qsd-{version}-schema.json").read_text())
              if e["meta-type"] == "command"}
    ours = Schema.load(version=version).commands
    assert {n: c.features for n, c in ours.items()} == {n: theirs[n] for n in ours}


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_json_schema_document_of_each_version(tmp_path, version):
    out = tmp_path / "schema.json"
    assert main(["--qemu-version", version, "--json-schema", str(out)]) == 0
    doc = json.loads(out.read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc == Schema.load(version=version).json_schema()
    add = jsonschema.Draft202012Validator(doc)
    inactive = {"blockdev-add": {"driver": "null-co", "node-name": "n", "active": False}}
    assert add.is_valid(inactive) == (version != "7.2")
