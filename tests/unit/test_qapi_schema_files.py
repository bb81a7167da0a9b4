"""The schema files: the QAPI dialect reader and what the files define."""
from pathlib import Path

import pytest

from qmpjobd.qapi import Schema, default_schema_dir
from qmpjobd.qapi.model import SchemaError, TypeModel
from qmpjobd.qapi.parser import QAPIParseError, parse_file


def test_dialect(tmp_path: Path):
    (tmp_path / "inc.json").write_text("{ 'enum': 'E', 'data': [ 'a', 'b' ] }\n")
    (tmp_path / "top.json").write_text(
        "# comment\n##\n# @doc: ignored\n##\n"
        "{ 'include': 'inc.json' }\n{ 'include': 'inc.json' }\n"
        "{ 'struct': 'S', 'data': { 'e': 'E', '*n': 'uint8', 'l': ['str'] } }  # tail\n"
        "{ 'command': 'c', 'data': 'S', 'boxed': true }\n")
    exprs = parse_file(tmp_path / "top.json")
    assert [next(iter(e.expr)) for e in exprs] == ["enum", "struct", "command"]
    model = TypeModel(exprs)
    assert model.commands["c"].boxed and model.commands["c"].arg_type.name == "S"


@pytest.mark.parametrize("text", ["{ 'a': 'b' ", "{ \"a\": 'b' }", "{ 'a' 'b' }", "[ 'x' ]"])
def test_syntax_errors(tmp_path: Path, text):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(QAPIParseError):
        parse_file(tmp_path / "bad.json")


def test_unknown_type_is_an_error(tmp_path: Path):
    (tmp_path / "s.json").write_text("{ 'struct': 'S', 'data': { 'x': 'Nope' } }")
    with pytest.raises(SchemaError):
        TypeModel(parse_file(tmp_path / "s.json"))


def test_default_directory_is_the_repo_schema():
    assert default_schema_dir() == Path(__file__).resolve().parents[2] / "schema"


def test_command_definitions():
    s = Schema.load()
    order = s.command_names_registration_order()
    assert order[:3] == ["query-block", "query-blockstats", "query-block-jobs"]
    assert order[-1] == "transaction"
    assert set(order) == set(s.commands)
    cancel = s.commands["block-job-cancel"]
    assert [m.name for m in cancel.arg_type.members] == ["device", "force"]
    assert s.commands["blockdev-add"].boxed and s.commands["blockdev-add"].arg_type.name == "BlockdevOptions"
    assert s.commands["drive-backup"].features == ["deprecated"]
    assert not any(c.allow_oob for c in s.commands.values())
    assert s.commands["query-jobs"].ret_type.element.name == "JobInfo"
    kinds = s.model.types["TransactionActionKind"]
    assert kinds.values[-1] == "drive-backup" and kinds.members[-1].features == ["deprecated"]
    # implicit empty branches come last, in enum order, as in QEMU
    create = s.model.types["BlockdevCreateOptions"]
    assert [c for c, _ in create.variants][:2] == ["file", "gluster"]
    assert dict(create.variants)["null-co"].name == "q_empty"
