"""Coverage-guided fuzzing of the QAPI argument validator.

The first byte picks a command of the schema; the rest is lexed as QMP input and the
first value that is an object becomes that command's arguments (a non-object value is
wrapped as ``{"<member>": value}`` for a member of the command, so scalars reach the
type checks). The validator must answer with a QMPError or a result; anything else
it raises is a bug. A second validation of the same input must give the same answer.
"""

from __future__ import annotations

from _harness import Bug, run

schema = lexer = QMPError = None
commands: list[str] = []


def _load() -> None:
    global schema, lexer, QMPError, commands
    from qmpjobd.errors import QMPError as error
    from qmpjobd.qapi import Schema
    from qmpjobd.wire import lexer as lexer_module
    schema, lexer, QMPError = Schema.load(version="7.2"), lexer_module, error
    commands = sorted(schema.commands)


def _member_names(command: str) -> list[str]:
    arg_type = schema.commands[command].arg_type
    members = getattr(arg_type, "members", None) or []
    return [getattr(m, "name", str(m)) for m in members] or ["x"]


def _answer(command: str, arguments: dict) -> str:
    try:
        schema.validate(command, arguments)
    except QMPError as err:
        return f"{err.error_class}: {err.desc}"
    except Exception as exc:
        raise Bug(f"{command} {arguments!r:.300}: {type(exc).__name__}: {exc}") from exc
    return "ok"


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    command = commands[data[0] % len(commands)]
    names = _member_names(command)
    for item in lexer.StreamParser().feed(data[2:] + b" "):
        if not isinstance(item, lexer.ParsedValue):
            continue
        value = item.value
        arguments = value if isinstance(value, dict) else {names[data[1] % len(names)]: value}
        first = _answer(command, arguments)
        if _answer(command, arguments) != first:
            raise Bug(f"{command}: two validations of the same arguments differ")
        return


if __name__ == "__main__":
    run(one_input, _load)
