"""User-created objects (``object-add``, ``--object``): the registry the
block layer looks objects up in, and their QOM properties.

A storage daemon user creates three kinds of object that qmpjobd implements:

* ``iothread``: event-loop tuning knobs (``poll-max-ns``, ``thread-pool-*``...);
  qmpjobd runs every node in its one event loop, so they are recorded and
  reported, not acted on;
* ``secret``: a password or key from ``data`` or ``file``, ``raw`` or
  ``base64`` (``Secret.value`` holds the decoded bytes);
* ``throttle-group``: I/O limits shared by the nodes of a throttle filter
  (``ThrottleGroup.limits``).

Each object type is a small class with a table of properties: a getter, an
optional setter that checks a value as QEMU's setter does, and whether the
value may change after creation.  What the real daemon *lists* (property
names, their QOM type names and order, the initial values, the class list
of ``qom-list-types``) comes from ``qmpjobd/data/qom-<version>.json``,
recorded from the real daemons by ``scripts/gen_qom_data.py``.

The block layer asks ``daemon.objects.get(id, "secret")``; objects that a
node uses are marked with ``obj.users += 1`` so ``object-del`` refuses them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qmpjobd.errors import QMPError
from qmpjobd.qapi.ghash import GHashSet, qdict_order
from qmpjobd.versions import Behaviour, Personality

DATA_DIR = Path(__file__).resolve().parent / "data"

INT64_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
# QEMU's upper bound for every throttle rate and burst (THROTTLE_VALUE_MAX).
THROTTLE_VALUE_MAX = 1_000_000_000_000_000

# Behaviour differences of the object layer.
OBJECTS_CONTAINER_AT_START = Behaviour(
    "the /objects container exists from start-up (7.2 creates it with the first object)",
    since="10.0")
SECRET_LOADED_PROPERTY = Behaviour(
    "secrets have a 'loaded' property", since="7.2", until="10.0")

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def generic(desc: str) -> QMPError:
    return QMPError(desc, "GenericError")


@functools.cache
def qom_data(version: str) -> dict:
    """What the real daemon of *version* lists (see the module docstring)."""
    return json.loads((DATA_DIR / f"qom-{version}.json").read_text())


def is_identifier(text: str) -> bool:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    return bool(_IDENTIFIER.match(text))


# -- property values ---------------------------------------------------------

def want_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise generic(f"Invalid parameter type for '{name}', expected: integer")
    return value


def want_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise generic(f"Invalid parameter type for '{name}', expected: string")
    return value


def want_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise generic(f"Invalid parameter type for '{name}', expected: boolean")
    return value


@dataclass(frozen=True)
class Prop:
    """One QOM property of an object type."""

    get: Callable[[Any], object]
    set: Callable[[Any, object], None] | None = None
    # False: only object-add may give it (QEMU: "cannot be set after initialization").
    after_creation: bool = True


class UserObject:
    """A user-created object: its id, QOM type and properties."""

    qom_type = "object"
    PROPS: dict[str, Prop] = {}

    def __init__(self, ident: str, personality: Personality) -> None:
        self.id = ident
        self.personality = personality
        self.complete = False
        # Nodes (or other users) that reference this object; object-del refuses while > 0.
        self.users = 0

    # QEMU builds the object, sets the given properties, then "completes" it.
    def finish(self) -> None:
        self.complete = True

    def property_names(self) -> list[str]:
        return [p["name"] for p in qom_data(self.personality.version)["properties"][self.qom_type]]

    def property_type(self, name: str) -> str | None:
        for p in qom_data(self.personality.version)["properties"][self.qom_type]:
            if p["name"] == name:
                return p["type"]
        return None

    def prop(self, name: str) -> Prop:
        if name == "type":
            return Prop(get=lambda obj: obj.qom_type)
        found = self.PROPS.get(name)
        if found is None or name not in self.property_names():
            raise generic(f"Property '{self.qom_type}.{name}' not found")
        return found

    def get(self, name: str) -> object:
        return self.prop(name).get(self)

    def set(self, name: str, value: object) -> None:
        prop = self.prop(name)
        if prop.set is None:
            raise generic(f"Property '{self.qom_type}.{name}' is not writable")
        if self.complete and not prop.after_creation:
            raise generic("Property cannot be set after initialization")
        prop.set(self, value)


# -- iothread -------------------------------------------------------------------

def _iothread_param(name: str, maximum: int = INT64_MAX) -> Prop:
    attr = name.replace("-", "_")

    def setter(obj: "IOThread", value: object) -> None:
        number = want_int(name, value)
        if not 0 <= number <= maximum:
            raise generic(f"{name} value must be in range [0, {maximum}]")
        old = getattr(obj, attr)
        setattr(obj, attr, number)
        if obj.complete and attr.startswith("thread_pool"):
            try:
                obj.check_thread_pool()
            except QMPError:
                setattr(obj, attr, old)
                raise

    return Prop(get=lambda obj: getattr(obj, attr), set=setter)


class IOThread(UserObject):
    qom_type = "iothread"
    PROPS = {name: _iothread_param(name) for name in (
        "poll-max-ns", "poll-grow", "poll-shrink", "poll-weight", "aio-max-batch",
        "thread-pool-min", "thread-pool-max")}

    def __init__(self, ident: str, personality: Personality) -> None:
        super().__init__(ident, personality)
        initial = qom_data(personality.version)["initial"]["iothread"]
        for name in self.PROPS:
            setattr(self, name.replace("-", "_"), initial.get(name, 0))

    def check_thread_pool(self) -> None:
        low, high = self.thread_pool_min, self.thread_pool_max  # type: ignore[attr-defined]
        if low > high or not high or low > INT_MAX or high > INT_MAX:
            raise generic("bad thread-pool-min/thread-pool-max values")

    def finish(self) -> None:
        self.check_thread_pool()
        super().finish()


# -- secret ----------------------------------------------------------------------

def _secret_str(attr: str) -> Prop:
    def setter(obj: "Secret", value: object) -> None:
        setattr(obj, attr, want_str(attr, value))
    return Prop(get=lambda obj: getattr(obj, attr) or "", set=setter)


def _set_format(obj: "Secret", value: object) -> None:
    text = want_str("format", value)
    if text not in ("raw", "base64"):
        raise generic(f"Parameter 'format' does not accept value '{text}'")
    obj.format = text


def _set_loaded(obj: "Secret", value: object) -> None:
    wanted = want_bool("loaded", value)
    if wanted and obj.value is None:
        obj.load()
    elif not wanted and obj.value is not None:
        raise generic("Cannot unload requested secret")


class Secret(UserObject):
    qom_type = "secret"
    PROPS = {
        "data": _secret_str("data"),
        "file": _secret_str("file"),
        "iv": _secret_str("iv"),
        "keyid": _secret_str("keyid"),
        "format": Prop(get=lambda obj: obj.format, set=_set_format),
        "loaded": Prop(get=lambda obj: obj.value is not None, set=_set_loaded),
    }

    def __init__(self, ident: str, personality: Personality,
                 lookup: Callable[[str], "Secret | None"] = lambda _id: None) -> None:
        super().__init__(ident, personality)
        self.data: str | None = None
        self.file: str | None = None
        self.iv: str | None = None
        self.keyid: str | None = None
        self.format = "raw"
        # The decoded secret, once loaded.
        self.value: bytes | None = None
        self._lookup = lookup

    def load(self) -> None:
        """Read the secret as QEMU does on completion: exactly one source,
        base64 decoded when asked, then (keyid) decrypted."""
        if self.data is not None and self.file is not None:
            raise generic("'file' and 'data' are mutually exclusive")
        if self.file is not None:
            try:
                with open(self.file, "rb") as source:
                    raw = source.read()
            except OSError as exc:
                raise generic(f"Unable to read {self.file}: Failed to open file "
                              f"\u201c{self.file}\u201d: {exc.strerror}") from None
        elif self.data is not None:
            raw = self.data.encode()
        else:
            raise generic("Either 'file' or 'data' must be provided")
        if self.keyid:
            key = self._lookup(self.keyid)
            if key is None:
                raise generic(f"No secret with id '{self.keyid}'")
            if key.value is None or len(key.value) != 32:
                raise generic("Key should be 32 bytes in length")
            raise generic("encrypted secrets (keyid) are not supported by qmpjobd")
        if self.format == "base64":
            raw = decode_base64(raw)
        self.value = raw

    def finish(self) -> None:
        if self.value is None:
            self.load()
        super().finish()


def decode_base64(raw: bytes) -> bytes:
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise generic("Base64 data contains invalid characters") from None


# -- throttle-group --------------------------------------------------------------

# ThrottleLimits members in QAPI order; buckets in QEMU's BucketType order.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
LIMIT_NAMES = tuple(n for b in ("iops-total", "iops-read", "iops-write",
                                "bps-total", "bps-read", "bps-write")
                    for n in (b, b + "-max", b + "-max-length")) + ("iops-size",)


def _limit_prop(name: str) -> Prop:
    """x-<limit>: the legacy one-value-per-property form, settable only at creation."""
    def setter(obj: "ThrottleGroup", value: object) -> None:
        obj.set_limits({name: want_int("x-" + name, value)}, check=False)
    return Prop(get=lambda obj: obj.limits[name], set=setter, after_creation=False)


def _set_limits_prop(obj: "ThrottleGroup", value: object) -> None:
    if not isinstance(value, dict):
        raise generic("Invalid parameter type for 'limits', expected: object")
    obj.set_limits(value, check=obj.complete)


class ThrottleGroup(UserObject):
    qom_type = "throttle-group"
    PROPS = {"limits": Prop(get=lambda obj: obj.limits_view(), set=_set_limits_prop),
             **{"x-" + name: _limit_prop(name) for name in LIMIT_NAMES}}

    def __init__(self, ident: str, personality: Personality) -> None:
        super().__init__(ident, personality)
        self.limits: dict[str, int] = {
            name: 1 if name.endswith("-max-length") else 0 for name in LIMIT_NAMES}

    def limits_view(self) -> dict[str, int]:
        # qom-get builds a QDict: its members come out in QDict order.
        return {name: self.limits[name] for name in qdict_order(list(LIMIT_NAMES))}

    def set_limits(self, given: dict, check: bool) -> None:
        for name, value in given.items():
            if not 0 <= value <= THROTTLE_VALUE_MAX:
                raise generic(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
        merged = {**self.limits, **given}
        if check:
            check_throttle_limits(merged)
        self.limits = merged

    def finish(self) -> None:
        check_throttle_limits(self.limits)
        super().finish()


def check_throttle_limits(limits: dict[str, int]) -> None:
    """QEMU's throttle_is_valid(), in its order of checks."""
    for kind in ("bps", "iops"):
        if limits[f"{kind}-total"] and (limits[f"{kind}-read"] or limits[f"{kind}-write"]) \
                or limits[f"{kind}-total-max"] and (limits[f"{kind}-read-max"]
                                                    or limits[f"{kind}-write-max"]):
            raise generic("bps/iops/max total values and read/write values cannot be used "
                          "at the same time")
    if limits["iops-size"] and not any(limits[b] for b in ("iops-total", "iops-read", "iops-write")):
        raise generic("iops size requires an iops value to be set")
    for bucket in BUCKETS:
        avg, peak, length = limits[bucket], limits[bucket + "-max"], limits[bucket + "-max-length"]
        if not length:
            raise generic("the burst length cannot be 0")
        if length > 1 and not peak:
            raise generic("burst length set without burst rate")
        if peak and length > THROTTLE_VALUE_MAX // peak:
            raise generic("burst length too high for this burst rate")
        if peak and not avg:
            raise generic("bps_max/iops_max require corresponding bps/iops values")
        if peak and peak < avg:
            raise generic("bps_max/iops_max cannot be lower than bps/iops")


# -- the registry ------------------------------------------------------------------

OBJECT_CLASSES: dict[str, type[UserObject]] = {
    cls.qom_type: cls for cls in (IOThread, Secret, ThrottleGroup)}


class ObjectRegistry:
    """The objects under ``/objects``, by id, in creation order."""

    def __init__(self, personality: Personality | Callable[[], Personality]) -> None:
        # A daemon passes a provider: its personality is its schema's, which
        # tests may set after building the daemon.
        self._personality = personality
        self._objects: dict[str, UserObject] = {}
        # /objects is a QOM container: its children sit in a GLib hash table.
        self._order = GHashSet()
        self._container_made = False
        # x-blockdev-set-iothread: node name -> iothread id (None: the main loop).
        self.node_iothreads: dict[str, str | None] = {}

    @property
    def personality(self) -> Personality:
        found = self._personality
        return found if isinstance(found, Personality) else found()

    @property
    def container_exists(self) -> bool:
        """Does /objects exist yet (7.2 creates it with the first object)?"""
        return self._container_made or self.personality.has(OBJECTS_CONTAINER_AT_START)

    def __iter__(self) -> Iterator[UserObject]:
        return iter(self._objects.values())

    def __contains__(self, ident: str) -> bool:
        return ident in self._objects

    def get(self, ident: str, qom_type: str | None = None) -> UserObject | None:
        """The object *ident* (of *qom_type* when given), or None."""
        found = self._objects.get(ident)
        if found is None or (qom_type is not None and found.qom_type != qom_type):
            return None
        return found

    def hash_order(self) -> list[str]:
        """Ids in the container's hash-table order (qom-list prints it reversed)."""
        return list(self._order)

    def add(self, qom_type: str, ident: str, props: dict[str, object],
            reserved: Callable[[str], bool] = lambda _id: False) -> UserObject:
        """object-add: QEMU's order of checks (id, type, each property in the
        arguments' QDict order, duplicate id, completion)."""
        if not is_identifier(ident):
            raise generic("Parameter 'id' expects an identifier")
        known = {t["name"]: t for t in qom_data(self.personality.version)["types"]}
        if qom_type not in known:
            raise generic(f"invalid object type: {qom_type}")
        cls = OBJECT_CLASSES.get(qom_type)
        if cls is None:
            raise generic(f"object type '{qom_type}' is not supported by qmpjobd")
        obj = cls(ident, self.personality, self.secret_lookup) if cls is Secret \
            else cls(ident, self.personality)
        for name in qdict_order(list(props)):
            obj.set(name, props[name])
        self._container_made = True
        if ident in self._objects or reserved(ident):
            raise generic(f"attempt to add duplicate property '{ident}' to object (type 'container')")
        obj.finish()
        self._objects[ident] = obj
        self._order.add(ident)
        return obj

    def secret_lookup(self, ident: str) -> Secret | None:
        found = self.get(ident, "secret")
        return found if isinstance(found, Secret) else None

    def remove(self, ident: str) -> None:
        """object-del."""
        obj = self._objects.get(ident)
        if obj is None:
            raise generic(f"object '{ident}' not found")
        if obj.users:
            raise generic(f"object '{ident}' is in use, can not be deleted")
        del self._objects[ident]
        self._order.remove(ident)
