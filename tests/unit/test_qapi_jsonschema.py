"""The derived JSON Schema and the compiled validator agree.

Inputs are generated from the type model (valid values) and then damaged in
random ways; for every input the jsonschema package and Schema.validate()
must give the same verdict.  QMP integers are JSON integers, so the checker
used for the comparison does not count 1.0 as an integer (jsonschema does).
"""
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpjobd.errors import QMPError
from qmpjobd.qapi import Schema
from qmpjobd.qapi.__main__ import main
from qmpjobd.qapi.jsonschema import command_schema
from qmpjobd.qapi.model import (INT_RANGES, AlternateType, ArrayType, BuiltinType,
                                EnumType, ObjectType)

SCHEMA = Schema.load()
DOC = SCHEMA.json_schema()


def _is_int(_checker, value):
    return type(value) is int


_CHECKER = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int)
Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_CHECKER)
VALIDATORS = {name: Validator(command_schema(DOC, name)) for name in SCHEMA.commands}


def values_for(t, depth=0):
    """A strategy of values that the type *t* accepts."""
    if isinstance(t, BuiltinType):
        if t.name in INT_RANGES:
            lo, hi = INT_RANGES[t.name]
            return st.integers(lo, hi)
        return {"str": st.text(max_size=5), "bool": st.booleans(), "null": st.none(),
                "number": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5),
                "any": st.integers(0, 3)}[t.name]
    if isinstance(t, EnumType):
        return st.sampled_from(t.values)
    if isinstance(t, ArrayType):
        return st.lists(values_for(t.element, depth + 1), max_size=2 if depth < 3 else 0)
    if isinstance(t, AlternateType):
        branches = [bt for _, bt in t.branches
                    if depth < 3 or not isinstance(bt, ObjectType)]
        return st.one_of([values_for(bt, depth + 1) for bt in branches])
    assert isinstance(t, ObjectType)
    if t.tag is None:
        return _members(t.members, depth)
    return st.one_of([_members(t.members + vt.members, depth, (t.tag, case))
                      for case, vt in t.variants])


def _members(members, depth, pin=None):
    fixed = {}
    optional = {}
    for m in members:
        if pin and m.name == pin[0]:
            fixed[m.name] = st.just(pin[1])
        elif m.optional:
            if depth < 3:
                optional[m.name] = values_for(m.type, depth + 1)
        else:
            fixed[m.name] = values_for(m.type, depth + 1)
    return st.fixed_dictionaries(fixed, optional=optional)


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False),
                 st.sampled_from(["", "bogus", "full"]), st.just([]), st.just({}),
                 st.just({"x": 1}), st.just([1]))


def damage(draw, value):
    """Randomly break one spot of *value* (or leave it alone)."""
    choice = draw(st.integers(0, 4))
    if isinstance(value, dict) and value and choice < 3:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        if choice == 0:
            del out[key]
        elif choice == 1:
            out[key] = damage(draw, out[key])
        else:
            out[draw(st.sampled_from(["bogus", "x", key]))] = draw(JUNK)
        return out
    if isinstance(value, list) and value and choice < 3:
        out = list(value)
        i = draw(st.integers(0, len(out) - 1))
        out[i] = damage(draw, out[i])
        return out
    if choice == 4:
        return value
    return draw(JUNK)


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(SCHEMA.commands)))
    cmd = SCHEMA.commands[name]
    t = cmd.arg_type or SCHEMA.model.types["q_empty"]
    value = draw(values_for(t))
    if draw(st.booleans()):
        value = damage(draw, value)
        if not isinstance(value, dict):
            value = {"bogus": value}
    return name, value


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_verdicts_agree_with_jsonschema(case):
    name, args = case
    try:
        SCHEMA.validate(name, args)
        ours = True
    except QMPError:
        ours = False
    assert VALIDATORS[name].is_valid(args) == ours, (name, args)


def test_document_shape():
    jsonschema.Draft202012Validator.check_schema(DOC)
    assert DOC["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(DOC["properties"]) == list(SCHEMA.commands)
    backup = DOC["$defs"]["BlockdevBackup"]
    assert list(backup["properties"])[:3] == ["job-id", "device", "sync"]
    assert backup["required"] == ["device", "sync", "target"]
    assert backup["additionalProperties"] is False
    assert backup["properties"]["x-perf"]["x-qapi-features"] == ["unstable"]
    gran = DOC["$defs"]["BlockDirtyBitmapAdd"]["properties"]["granularity"]
    assert gran == {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "x-qapi-type": "uint32"}
    opts = DOC["$defs"]["BlockdevOptions"]
    assert opts["x-qapi-discriminator"] == "driver"
    assert len(opts["oneOf"]) == len(SCHEMA.model.types["BlockdevDriver"].values)


def test_module_main_writes_document(tmp_path):
    out = tmp_path / "qapi.schema.json"
    assert main(["--json-schema", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(DOC))


@pytest.mark.parametrize("value", [1.0, True])
def test_integer_means_json_integer(value):
    assert not VALIDATORS["block-job-set-speed"].is_valid({"device": "j", "speed": value})
