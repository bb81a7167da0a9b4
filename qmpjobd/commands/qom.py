"""QOM: the object tree (qom-list, qom-get, qom-set, qom-list-get), the
class lists (qom-list-types, qom-list-properties) and user-created objects
(object-add, object-del).

The tree is rebuilt for each command from what exists: the root's
containers, ``/objects`` (the registry in ``daemon.objects``, plus the
monitors from 11.1 on), ``/chardevs`` (the server's chardevs).  Children of
a container sit in a GLib hash table and QEMU prepends each to the answer
while walking it, so listings come out in reversed hash order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qmpjobd.commands import Context, command
from qmpjobd.errors import QMPError
from qmpjobd.objects import OBJECTS_CONTAINER_AT_START, UserObject, generic, qom_data
from qmpjobd.qapi.ghash import GHashSet
from qmpjobd.versions import Behaviour

# Containers under the root, in an order of creation that gives the real
# daemons' hash order (checked by tests/integration/test_qom_oracle.py).
ROOT_CONTAINERS: tuple[tuple[str, Behaviour | None], ...] = (
    ("objects", None),
    ("chardevs", None),
    ("backend", Behaviour("a /backend container under the root", since="10.0")),
    ("audiodevs", Behaviour("an /audiodevs container under the root", since="11.1")),
)
# Each monitor is an object /objects/compat_monitor<N> (type monitor-qmp).
MONITOR_OBJECTS = Behaviour("monitors are QOM objects under /objects", since="11.1")


@dataclass
class Node:
    """One object of the QOM tree."""

    name: str
    qom_type: str
    path: str
    children: dict[str, "Node"] = field(default_factory=dict)   # hash-table order
    values: Callable[[str], object] | None = None               # property getter
    obj: UserObject | None = None
    props: list[dict] = field(default_factory=list)             # with values: qom-list

    def listing(self, version: str) -> list[dict]:
        """qom-list: the class's properties (``type`` first) and the children."""
        if self.obj is not None:
            return [dict(p) for p in qom_data(version)["properties"][self.qom_type]]
        if self.values is not None:
            return [dict(p) for p in self.props]
        out = [{"name": "type", "type": "string"}]
        out += [{"name": name, "type": f"child<{child.qom_type}>"}
                for name, child in reversed(list(self.children.items()))]
        return out

    def get(self, prop: str) -> object:
        if prop in self.children:
            return self.children[prop].path
        if self.obj is not None:
            return self.obj.get(prop)
        if prop == "type":
            return self.qom_type
        if self.values is not None and prop in {p["name"] for p in self.props}:
            return self.values(prop)
        raise generic(f"Property '{self.qom_type}.{prop}' not found")

    def set(self, prop: str, value: object) -> None:
        if self.obj is not None:
            self.obj.set(prop, value)
            return
        if prop == "type" or prop in self.children or (
                self.values is not None and prop in {p["name"] for p in self.props}):
            raise generic(f"Property '{self.qom_type}.{prop}' is not writable")
        raise generic(f"Property '{self.qom_type}.{prop}' not found")


def container(name: str, path: str, children: list[Node]) -> Node:
    order = GHashSet()
    for child in children:
        order.add(child.name)
    by_name = {child.name: child for child in children}
    return Node(name, "container", path, {n: by_name[n] for n in order})


def build_tree(ctx: Context) -> Node:
    daemon = ctx.daemon
    personality = daemon.personality
    version = personality.version
    server = getattr(ctx.connection, "server", None)
    monitors = [m for m in getattr(server, "monitors", []) if m.frontend] if server else []
    chardevs = server.chardev_entries() if server else []

    objects = [Node(o.id, o.qom_type, f"/objects/{o.id}", obj=o) for o in daemon.objects]
    if personality.has(MONITOR_OBJECTS):
        objects += [monitor_node(version, i, spec) for i, spec in enumerate(monitors)]
    # Order of insertion matters to a hash table: user objects by creation,
    # monitors (created at start-up) before them.
    objects.sort(key=lambda n: (n.obj is not None,))
    subtrees = {
        "objects": container("objects", "/objects", objects),
        # The server keeps the container's own hash order (removals move it too).
        "chardevs": Node("chardevs", "container", "/chardevs",
                         {c.chardev_id: chardev_node(version, c) for c in chardevs}),
    }
    present = []
    for name, behaviour in ROOT_CONTAINERS:
        if behaviour is not None and not personality.has(behaviour):
            continue
        if name == "objects" and not (daemon.objects.container_exists or objects):
            continue
        present.append(subtrees.get(name) or container(name, f"/{name}", []))
    return container("", "/", present)


def monitor_node(version: str, index: int, spec) -> Node:
    values = {"chardev": spec.chardev_id, "pretty": spec.pretty}
    return Node(f"compat_monitor{index}", "monitor-qmp", f"/objects/compat_monitor{index}",
                values=lambda prop: values.get(prop, "default"),
                props=qom_data(version)["properties"].get("monitor-qmp") or [])


def chardev_node(version: str, chardev) -> Node:
    """A chardev of the server's registry (``qmpjobd.server.Chardev``)."""
    return Node(chardev.chardev_id, chardev.qom_type, f"/chardevs/{chardev.chardev_id}",
                values=chardev.qom_value,
                props=qom_data(version)["properties"].get(chardev.qom_type) or [])


def walk(start: Node, parts: list[str]) -> Node | None:
    node: Node | None = start
    for part in parts:
        if node is None:
            return None
        node = node.children.get(part)
    return node


def resolve(ctx: Context, path: str) -> Node:
    """QEMU's object_resolve_path: absolute, or partial (matching anywhere)."""
    root = build_tree(ctx)
    parts = [p for p in path.split("/") if p]
    if path.startswith("/"):
        found = walk(root, parts)
        if found is None:
            raise QMPError(f"Device '{path}' not found", "DeviceNotFound")
        return found
    matches: list[Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        hit = walk(node, parts)
        if hit is not None and all(hit is not m for m in matches):
            matches.append(hit)
        stack.extend(node.children.values())
    if len(matches) > 1:
        raise generic(f"Path '{path}' is ambiguous")
    if not matches:
        raise QMPError(f"Device '{path}' not found", "DeviceNotFound")
    return matches[0]


@command("qom-list")
def qom_list(ctx: Context, args: dict) -> list:
    return resolve(ctx, args["path"]).listing(ctx.daemon.personality.version)


@command("qom-get")
def qom_get(ctx: Context, args: dict) -> object:
    return resolve(ctx, args["path"]).get(args["property"])


@command("qom-set")
def qom_set(ctx: Context, args: dict) -> dict:
    resolve(ctx, args["path"]).set(args["property"], args["value"])
    return {}


@command("qom-list-get")
def qom_list_get(ctx: Context, args: dict) -> list:
    out = []
    for path in args["paths"]:
        node = resolve(ctx, path)
        props = []
        for entry in node.listing(ctx.daemon.personality.version):
            value = dict(entry)
            try:
                value["value"] = node.get(entry["name"])
            except QMPError:
                pass
            props.append(value)
        out.append({"properties": props})
    return out


@command("qom-list-types")
def qom_list_types(ctx: Context, args: dict) -> list:
    types = qom_data(ctx.daemon.personality.version)["types"]
    implements = args.get("implements")
    # Subtypes and implementers of interfaces alike, as the daemon named them.
    members = None if implements is None else set(
        qom_data(ctx.daemon.personality.version)["implementers"].get(implements, ()))
    return [dict(info) for info in types
            if (args.get("abstract", False) or not info.get("abstract"))
            and (members is None or info["name"] in members)]


@command("qom-list-properties")
def qom_list_properties(ctx: Context, args: dict) -> list:
    properties = qom_data(ctx.daemon.personality.version)["properties"]
    typename = args["typename"]
    if typename not in properties:
        raise QMPError(f"Class '{typename}' not found", "DeviceNotFound")
    answer = properties[typename]
    if answer is None:
        raise generic(f"qom-list-properties of '{typename}' is not supported by qmpjobd")
    if isinstance(answer, dict):
        raise QMPError(answer["desc"], answer["class"])
    return [dict(p) for p in answer]


@command("object-add")
def object_add(ctx: Context, args: dict) -> dict:
    props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
    taken = {n for n in build_tree(ctx).children.get("objects", Node("", "", "")).children
             if n not in ctx.daemon.objects}
    ctx.daemon.objects.add(args["qom-type"], args["id"], props, reserved=taken.__contains__)
    return {}


@command("object-del")
def object_del(ctx: Context, args: dict) -> dict:
    ident = args["id"]
    if ident not in ctx.daemon.objects:
        objects = build_tree(ctx).children.get("objects")
        node = objects.children.get(ident) if objects else None
        if node is not None and node.qom_type == "monitor-qmp":
            current = getattr(ctx.connection, "monitor", None)
            if current is not None and node.values("chardev") == current.chardev_id:
                raise generic("Cannot delete the current QMP monitor")
            raise generic("deleting a monitor is not supported by qmpjobd")
    ctx.daemon.objects.remove(ident)
    return {}


@command("x-blockdev-set-iothread")
def x_blockdev_set_iothread(ctx: Context, args: dict) -> dict:
    """Record which iothread a node is meant to run in.  qmpjobd runs every
    node in its one event loop, so this changes no behaviour; QEMU's checks
    and messages are kept."""
    name = args["node-name"]
    node = ctx.daemon.graph.find(name)
    if node is None:
        raise generic(f"Failed to find node with node-name='{name}'")
    # QEMU counts BlockBackends only (a job holds one); parent nodes do not count.
    if not args.get("force", False) and node.job_users:
        raise generic(f"Node {name} is associated with a BlockBackend and could be in use "
                      "(use force=true to override this check)")
    target = args["iothread"]
    if target is not None and ctx.daemon.objects.get(target, "iothread") is None:
        raise generic(f"Cannot find iothread {target}")
    ctx.daemon.objects.node_iothreads[name] = target
    return {}


__all__ = ["OBJECTS_CONTAINER_AT_START", "resolve"]
