"""Coverage-guided fuzzing of the keyval parser behind ``--blockdev`` and friends.

The input (UTF-8, errors replaced) is parsed as keyval text, alone and as the options
of a few option types; the parser must answer with a QMPError or a value. Anything
else it raises is a bug (qmpjobd would die on start-up with a traceback).
"""

from __future__ import annotations

from _harness import Bug, run

schema = keyval_parse = QMPError = None
TYPES = ("BlockdevOptions", "BlockdevOptionsNull", "BlockdevOptionsFile", "BlockdevOptionsRaw")


def _load() -> None:
    global schema, keyval_parse, QMPError
    from qmpjobd.errors import QMPError as error
    from qmpjobd.qapi import Schema
    from qmpjobd.qapi.keyval import keyval_parse as parse
    schema, keyval_parse, QMPError = Schema.load(version="7.2"), parse, error


def _check(what: str, call) -> None:
    try:
        call()
    except QMPError:
        pass
    except Exception as exc:
        raise Bug(f"{what}: {type(exc).__name__}: {exc}") from exc


def one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", "replace")
    implied = ("driver", None, "backend", "chardev")[data[0] % 4]
    _check(f"keyval_parse({text!r:.200}, {implied!r})", lambda: keyval_parse(text, implied))
    type_name = TYPES[(data[0] >> 2) % len(TYPES)]
    _check(f"parse_keyval({type_name}, {text!r:.200})", lambda: schema.parse_keyval(type_name, text))


if __name__ == "__main__":
    run(one_input, _load)
