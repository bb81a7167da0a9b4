"""QEMU's keyval syntax (util/keyval.c): ``driver=null-co,node-name=n0,size=1M``.

Produces the tree QEMU's keyval_parse() builds: every value a string, dotted
keys nested into objects, objects whose keys are all 0..N-1 turned into
lists, ``,,`` standing for a literal comma.  A first parameter without ``=``
is the value of the *implied key* (``driver`` for ``--blockdev``).
"""
from __future__ import annotations

import re

from ..errors import QMPError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")


def _fragment_len(key: str, pos: int, first: bool) -> int:
    if not first:
        m = _INDEX.match(key, pos)
        if m:
            return m.end() - pos
    m = _NAME.match(key, pos)
    return m.end() - pos if m else 0


def _put(cur: dict, frag: str, value: str | None, key_prefix: str) -> dict | str:
    old = cur.get(frag)
    if old is not None:
        if isinstance(old, dict) == (value is not None):
            raise QMPError(f"Parameters '{key_prefix}.*' used inconsistently")
        if value is None:
            return old
    new: dict | str = {} if value is None else value
    cur[frag] = new      # a repeated leaf key: the last value wins
    return new


# QEMU's key fragment buffer (key_in_cur): fragments of 128 bytes or more are refused.
_FRAGMENT_MAX = 128


def _parse_one(root: dict, text: str, pos: int, implied_key: str | None) -> int:
    end = pos
    while end < len(text) and text[end] not in "=,":
        end += 1
    implied = implied_key is not None and end > pos and (end == len(text) or text[end] != "=")
    key = implied_key if implied else text[pos:end]
    cur, kpos = root, 0
    while True:
        flen = _fragment_len(key, kpos, kpos == 0)
        if not flen or (kpos + flen < len(key) and key[kpos + flen] != "."):
            raise QMPError(f"Invalid parameter '{key}'")
        frag = key[kpos:kpos + flen]
        if len(frag.encode()) >= _FRAGMENT_MAX:
            # QEMU copies each fragment into a 128-byte buffer; a fragment that is
            # not the whole key is called one.
            whole = kpos == 0 and flen == len(key)
            raise QMPError(f"Parameter{'' if whole else ' fragment'} '{frag}' is too long")
        kpos += flen
        if kpos >= len(key):
            break
        nxt = _put(cur, frag, None, key[:kpos])
        cur = nxt  # type: ignore[assignment]
        kpos += 1
    if implied:
        s = pos
    else:
        if end >= len(text) or text[end] != "=":
            raise QMPError(f"Expected '=' after parameter '{key}'")
        s = end + 1
    val: list[str] = []
    while s < len(text):
        ch = text[s]
        if ch == ",":
            s += 1
            if s >= len(text) or text[s] != ",":
                break
        val.append(text[s])
        s += 1
    _put(cur, frag, "".join(val), key)
    return s


def _listify(node: dict, prefix: str) -> dict | list:
    for k, v in list(node.items()):
        if isinstance(v, dict):
            node[k] = _listify(v, f"{prefix}{k}.")
    keys = list(node)
    indexed = [k for k in keys if _INDEX.fullmatch(k)]
    if not indexed:
        return node
    if len(indexed) != len(keys):
        raise QMPError(f"Parameters '{prefix}*' used inconsistently")
    elems = {int(k): v for k, v in node.items()}
    for i in range(len(elems)):
        if i not in elems:
            raise QMPError(f"Parameter '{prefix}{i}' missing")
    return [elems[i] for i in range(len(elems))]


def keyval_parse(text: str, implied_key: str | None = None) -> dict:
    """Parse keyval *text* into a tree of dicts, lists and strings."""
    root: dict = {}
    pos = 0
    first = True
    while pos < len(text):
        pos = _parse_one(root, text, pos, implied_key if first else None)
        first = False
    out = _listify(root, "")
    assert isinstance(out, dict)
    return out
