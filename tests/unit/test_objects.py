"""The object registry (qmpjobd.objects): what the block layer looks up."""
import pytest

from qmpjobd.errors import QMPError
from qmpjobd.objects import ObjectRegistry, Secret, ThrottleGroup
from qmpjobd.versions import KNOWN_VERSIONS, personality


@pytest.fixture(params=KNOWN_VERSIONS)
def registry(request) -> ObjectRegistry:
    return ObjectRegistry(personality(request.param))


def test_lookup_by_id_and_type(registry):
    registry.add("secret", "s0", {"data": "pw"})
    registry.add("iothread", "io0", {})
    assert isinstance(registry.get("s0", "secret"), Secret)
    assert registry.get("s0", "throttle-group") is None
    assert registry.get("nope") is None
    assert [o.id for o in registry] == ["s0", "io0"]


def test_secret_values_are_decoded(registry, tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"\x00raw bytes\n")
    registry.add("secret", "raw", {"data": "pw"})
    registry.add("secret", "b64", {"data": "aGVsbG8=", "format": "base64"})
    registry.add("secret", "file", {"file": str(key)})
    assert registry.get("raw").value == b"pw"
    assert registry.get("b64").value == b"hello"
    assert registry.get("file").value == b"\x00raw bytes\n"
    with pytest.raises(QMPError, match="invalid characters"):
        registry.add("secret", "bad", {"data": "@@@", "format": "base64"})
    assert registry.get("bad") is None


def test_a_failed_add_leaves_nothing(registry):
    with pytest.raises(QMPError, match="Either 'file' or 'data'"):
        registry.add("secret", "s0", {})
    assert "s0" not in registry
    registry.add("secret", "s0", {"data": "x"})
    with pytest.raises(QMPError, match="duplicate property 's0'"):
        registry.add("iothread", "s0", {})
    assert registry.get("s0", "secret") is not None


def test_throttle_limits_merge_and_validate(registry):
    group = registry.add("throttle-group", "tg", {"limits": {"iops-total": 100}})
    assert isinstance(group, ThrottleGroup)
    assert group.limits["iops-total"] == 100 and group.limits["bps-total-max-length"] == 1
    group.set("limits", {"bps-total": 5})
    assert group.limits["iops-total"] == 100 and group.limits["bps-total"] == 5
    with pytest.raises(QMPError, match="cannot be used at the same time"):
        group.set("limits", {"bps-read": 1})
    assert group.limits["bps-read"] == 0
    with pytest.raises(QMPError, match="cannot be set after initialization"):
        group.set("x-iops-total", 1)


def test_objects_in_use_are_not_deleted(registry):
    secret = registry.add("secret", "s0", {"data": "x"})
    secret.users += 1
    with pytest.raises(QMPError, match="is in use"):
        registry.remove("s0")
    secret.users -= 1
    registry.remove("s0")
    with pytest.raises(QMPError, match="object 's0' not found"):
        registry.remove("s0")


def test_unsupported_and_unknown_types(registry):
    with pytest.raises(QMPError, match="invalid object type: memory-backend-ram"):
        registry.add("memory-backend-ram", "m", {})
    with pytest.raises(QMPError, match="not supported by qmpjobd"):
        registry.add("authz-simple", "a", {"identity": "x"})
    with pytest.raises(QMPError, match="expects an identifier"):
        registry.add("iothread", "1x", {})


def test_version_specific_properties():
    old, new = ObjectRegistry(personality("7.2")), ObjectRegistry(personality("11.1"))
    assert old.add("secret", "s", {"data": "x"}).get("loaded") is True
    with pytest.raises(QMPError, match="Property 'secret.loaded' not found"):
        new.add("secret", "s", {"data": "x"}).get("loaded")
    assert new.add("iothread", "io", {}).get("poll-weight") == 3
    with pytest.raises(QMPError, match="Property 'iothread.poll-weight' not found"):
        old.add("iothread", "io", {}).get("poll-weight")
