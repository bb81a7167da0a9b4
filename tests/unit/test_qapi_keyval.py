"""--blockdev style keyval input (messages observed from qemu-storage-daemon 7.2)."""
import pytest

from qmpjobd.errors import QMPError
from qmpjobd.qapi import Schema
from qmpjobd.qapi.keyval import keyval_parse


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


def test_parse_tree():
    assert keyval_parse("null-co,node-name=n0,cache.direct=on", "driver") == \
        {"driver": "null-co", "node-name": "n0", "cache": {"direct": "on"}}
    assert keyval_parse("driver=quorum,children.0=a,children.1.driver=null-co") == \
        {"driver": "quorum", "children": ["a", {"driver": "null-co"}]}
    assert keyval_parse("driver=file,filename=a,,b") == {"driver": "file", "filename": "a,b"}


def test_typed_conversion(schema):
    out = schema.parse_keyval("BlockdevOptions",
                              "null-co,node-name=n0,size=0x10,latency-ns=5,read-zeroes=yes")
    assert out == {"driver": "null-co", "node-name": "n0", "size": 16, "latency-ns": 5,
                   "read-zeroes": True}
    out = schema.parse_keyval("BlockdevCreateOptions", "driver=file,filename=x,size=1.5M")
    assert out["size"] == 1572864
    out = schema.parse_keyval("BlockdevOptions", "driver=qcow2,node-name=q,file=f0")
    assert out["file"] == "f0"


def test_json_form(schema):
    assert schema.parse_keyval("BlockdevOptions", '{"driver": "null-co", "node-name": "n"}') == \
        {"driver": "null-co", "node-name": "n"}
    with pytest.raises(QMPError, match="Parameter 'size' is unexpected|integer"):
        schema.parse_keyval("BlockdevOptions", '{"driver": "null-co", "size": "1M"}')


@pytest.mark.parametrize("text,message", [
    ("driver=null-co,node-name=a,node-name=b,size=x", "Parameter 'size' expects integer"),
    ("null-co,node-name=a,size=1.5M", "Parameter 'size' expects integer"),
    ("driver=null-co,node-name=a,read-zeroes=maybe", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,cache.direct=x", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("driver=null-co,node-name=a,cache=x", "Invalid parameter type for 'cache', expected: object"),
    ("driver=null-co,,x", "Parameter 'driver' does not accept value 'null-co,x'"),
    ("driver=null-co,node-name=a,a..b=1", "Invalid parameter 'a..b'"),
    ("driver=null-co,node-name=a,foo", "Expected '=' after parameter 'foo'"),
    ("driver=quorum,node-name=q,children.1=a,vote-threshold=1", "Parameter 'children.0' missing"),
    ("driver=quorum,node-name=q,children.0=a,children.x=b,vote-threshold=1",
     "Parameters 'children.*' used inconsistently"),
    ("driver=null-co,node-name=a,cache.direct=on,cache=x", "Parameters 'cache.*' used inconsistently"),
    ("driver=null-co,node-name=a,size=010,bogus=1", "Parameter 'bogus' is unexpected"),
    ("driver=file,node-name=a,filename=/x,aio-max-batch=1k", "Parameter 'aio-max-batch' expects integer"),
    ("driver=file,node-name=a,filename=a,,b,bogus=1", "Parameter 'bogus' is unexpected"),
])
def test_qemu_messages(schema, text, message):
    with pytest.raises(QMPError) as info:
        schema.parse_keyval("BlockdevOptions", text)
    assert info.value.desc == message


@pytest.mark.parametrize("text, value", [
    ("16777216", 16777216), ("0x10", 16), ("010", 8), ("0", 0), ("7", 7), ("-5", -5),
])
def test_keyval_integers_use_base_zero(text, value):
    schema = Schema.load()
    parsed = schema.parse_keyval("BlockdevOptions", f"null-co,node-name=n,latency-ns={text}")
    assert parsed["latency-ns"] == (value if value >= 0 else value % 2**64)


@pytest.mark.parametrize("text", ["08", "019", "1x"])
def test_keyval_bad_integers(text):
    with pytest.raises(QMPError):
        Schema.load().parse_keyval("BlockdevOptions", f"null-co,node-name=n,size={text}")


# Found by fuzzing (fuzz/): inputs past CPython's int() digit limit and past QEMU's
# 128-byte key fragment buffer; messages observed from qemu-storage-daemon 7.2.
LONG = "9" * 5000


@pytest.mark.parametrize("text, message", [
    (f"null-co,node-name=n,size={LONG}", "Parameter 'size' expects integer"),
    (f"null-co,node-name=n,size=0x{'f' * 400}", "Parameter 'size' expects integer"),
    (f"null-co,node-name=n,a.{'1' * 5000}=x", f"Parameter fragment '{'1' * 5000}' is too long"),
    (f"null-co,node-name=n,{'a' * 128}=x", f"Parameter '{'a' * 128}' is too long"),
    (f"null-co,node-name=n,{'a' * 130}.b=x", f"Parameter fragment '{'a' * 130}' is too long"),
    ('{"driver":"null-co","node-name":"n","size":%s}' % LONG,
     "Invalid parameter type for 'size', expected: integer"),
])
def test_keyval_huge_inputs_get_qemus_errors(schema, text, message):
    with pytest.raises(QMPError) as info:
        schema.parse_keyval("BlockdevOptions", text)
    assert info.value.desc == message


def test_keyval_fragment_of_127_bytes_is_accepted():
    assert keyval_parse(f"{'a' * 127}=x") == {"a" * 127: "x"}


def test_keyval_leading_zeros_do_not_count_as_digits(schema):
    parsed = schema.parse_keyval("BlockdevOptions", f"null-co,node-name=n,size=0{'0' * 40}17")
    assert parsed["size"] == 0o17
