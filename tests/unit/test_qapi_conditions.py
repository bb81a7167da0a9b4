"""QAPI 'if' conditions: evaluation, and one schema text giving one view per
version (definitions, members, enum values, features, branches, includes)."""
from pathlib import Path

import pytest

from qmpjobd.qapi import Schema
from qmpjobd.qapi.conditions import ConditionError, check_condition, holds
from qmpjobd.qapi.model import SchemaError, TypeModel
from qmpjobd.qapi.parser import QAPIParseError, parse_file
from qmpjobd.versions import ALL_SCHEMA_SYMBOLS, KNOWN_VERSIONS


@pytest.mark.parametrize("cond,expected", [
    ("A", True),
    ("C", False),
    ({"not": "C"}, True),
    ({"all": ["A", "B"]}, True),
    ({"all": ["A", "C"]}, False),
    ({"any": ["C", "B"]}, True),
    ({"any": ["C", {"not": "A"}]}, False),
    ({"not": {"all": ["A", {"any": ["C", "B"]}]}}, False),
    (None, True),
])
def test_evaluation(cond, expected):
    assert holds(cond, {"A", "B"}) is expected


@pytest.mark.parametrize("cond", [{"nor": ["A"]}, {"all": []}, {"any": "A"}, 3,
                                  {"not": "A", "all": ["B"]}, {"not": "TYPO"}])
def test_malformed_conditions(cond):
    with pytest.raises(ConditionError):
        check_condition(cond, known={"A", "B"})


SCHEMA = """
{ 'enum': 'Kind', 'data': [ 'a', { 'name': 'b', 'if': 'NEW' },
                            { 'name': 'c', 'if': { 'not': 'NEW' } } ] }
{ 'struct': 'B', 'data': { 'x': 'int' } }
{ 'struct': 'S',
  'data': { 'keep': 'str',
            '*added': { 'type': 'int', 'if': 'NEW' },
            'gone': { 'type': 'str', 'if': { 'not': 'NEW' } },
            'flagged': { 'type': 'bool',
                         'features': [ { 'name': 'deprecated', 'if': 'NEW' } ] } } }
{ 'union': 'U', 'base': { 'kind': 'Kind', '*extra': { 'type': 'str', 'if': 'NEW' } },
  'discriminator': 'kind',
  'data': { 'a': 'B', 'b': { 'type': 'B', 'if': 'NEW' } } }
{ 'alternate': 'Alt', 'data': { 's': 'S', 'n': { 'type': 'int', 'if': 'NEW' } } }
{ 'command': 'old-cmd', 'if': { 'not': 'NEW' } }
{ 'command': 'cmd', 'data': { '*opt': { 'type': 'bool', 'if': 'NEW' } },
  'features': [ { 'name': 'deprecated', 'if': { 'all': [ 'NEW', 'OTHER' ] } } ] }
"""


def _model(tmp_path: Path, text: str, symbols: set[str]) -> TypeModel:
    (tmp_path / "s.json").write_text(text)
    return TypeModel(parse_file(tmp_path / "s.json"), symbols, known_symbols={"NEW", "OTHER"})


def test_old_view(tmp_path):
    m = _model(tmp_path, SCHEMA, set())
    assert m.types["Kind"].values == ["a", "c"]
    s = m.types["S"]
    assert [mb.name for mb in s.members] == ["keep", "gone", "flagged"]
    assert s.members[2].features == []
    u = m.types["U"]
    assert [mb.name for mb in u.members] == ["kind"]
    assert [case for case, _ in u.variants] == ["a", "c"]
    assert [b for b, _ in m.types["Alt"].branches] == ["s"]
    assert set(m.commands) == {"old-cmd", "cmd"}
    # a command whose only member is conditional has no argument type at all
    assert m.commands["cmd"].arg_type is None
    assert m.commands["cmd"].features == []


def test_new_view(tmp_path):
    m = _model(tmp_path, SCHEMA, {"NEW", "OTHER"})
    assert m.types["Kind"].values == ["a", "b"]
    s = m.types["S"]
    assert [(mb.name, mb.optional) for mb in s.members] == [
        ("keep", False), ("added", True), ("flagged", False)]
    assert s.members[2].features == ["deprecated"]
    u = m.types["U"]
    assert [mb.name for mb in u.members] == ["kind", "extra"]
    assert [(case, vt.name) for case, vt in u.variants] == [("a", "B"), ("b", "B")]
    assert [b for b, _ in m.types["Alt"].branches] == ["s", "n"]
    assert set(m.commands) == {"cmd"}
    assert [mb.name for mb in m.commands["cmd"].arg_type.members] == ["opt"]
    assert m.commands["cmd"].features == ["deprecated"]


def test_exclusive_redefinitions_and_real_duplicates(tmp_path):
    text = ("{ 'struct': 'T', 'if': 'NEW', 'data': { 'a': 'int' } }\n"
            "{ 'struct': 'T', 'if': { 'not': 'NEW' }, 'data': { 'b': 'int' } }\n")
    assert [mb.name for mb in _model(tmp_path, text, {"NEW"}).types["T"].members] == ["a"]
    assert [mb.name for mb in _model(tmp_path, text, set()).types["T"].members] == ["b"]
    overlapping = text.replace("{ 'not': 'NEW' }", "'OTHER'")
    with pytest.raises(SchemaError, match="defined twice"):
        _model(tmp_path, overlapping, {"NEW", "OTHER"})


def test_branch_for_a_removed_enum_value_is_an_error(tmp_path):
    text = ("{ 'enum': 'K', 'data': [ 'a', { 'name': 'b', 'if': 'NEW' } ] }\n"
            "{ 'struct': 'B', 'data': {} }\n"
            "{ 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k',\n"
            "  'data': { 'a': 'B', 'b': 'B' } }\n")
    _model(tmp_path, text, {"NEW"})
    with pytest.raises(SchemaError, match="lacks: b"):
        _model(tmp_path, text, set())


def test_unknown_symbol_is_an_error(tmp_path):
    with pytest.raises(SchemaError, match="NWE"):
        _model(tmp_path, "{ 'struct': 'T', 'data': { 'a': { 'type': 'int', 'if': 'NWE' } } }",
               {"NEW"})


def test_conditional_include_moves_a_module(tmp_path):
    (tmp_path / "a.json").write_text("{ 'command': 'from-a' }\n")
    (tmp_path / "b.json").write_text("{ 'command': 'from-b' }\n")
    (tmp_path / "top.json").write_text(
        "{ 'include': 'b.json', 'if': 'NEW' }\n"
        "{ 'include': 'a.json' }\n"
        "{ 'include': 'b.json' }\n")

    def order(symbols: set[str]) -> list[str]:
        return [e.expr["command"] for e in parse_file(tmp_path / "top.json", symbols=symbols)]

    assert order(set()) == ["from-a", "from-b"]
    assert order({"NEW"}) == ["from-b", "from-a"]
    (tmp_path / "top.json").write_text("{ 'include': 'a.json', 'if': { 'nor': [] } }\n")
    with pytest.raises(QAPIParseError):
        parse_file(tmp_path / "top.json")


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_every_version_of_the_real_schema_loads(version):
    schema = Schema.load(version=version)
    assert schema.version == version
    assert schema.personality.schema_conditions <= ALL_SCHEMA_SYMBOLS


def test_the_schema_files_name_only_known_symbols(tmp_path):
    # Schema.load checks every condition against ALL_SCHEMA_SYMBOLS; prove
    # the check is live by loading a copy with a misspelt symbol.
    src = Path(__file__).resolve().parents[2] / "schema"
    for f in src.glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    core = tmp_path / "block-core.json"
    core.write_text(core.read_text().replace("'QEMU_SINCE_10_0'", "'QEMU_SINCE_10_O'", 1))
    with pytest.raises(SchemaError, match="QEMU_SINCE_10_O"):
        Schema.load(tmp_path, version="10.0")
