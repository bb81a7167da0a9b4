"""Check QMP commands a management layer generates against a QEMU version's schema.

This is the run-time use of the ``jsonschema`` package: the schema is the JSON
Schema that ``qmpjobd.qapi.jsonschema`` derives from the QAPI files in
``schema/`` for one QEMU version (the same document ``make schema`` writes), and
the checking is jsonschema's, so a command passes here exactly when it matches
that published document. The daemon itself validates with its own compiled
validator (QEMU's messages); nothing here is imported by the daemon.

``validate(command)`` raises ``InvalidCommand``; ``command_errors(command)``
returns the problems as strings; ``qmpjobd check-commands FILE`` checks a file
(``check_commands_main``; the accepted line formats are in ``parse_line``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qmpjobd.versions import DEFAULT_VERSION, KNOWN_VERSIONS, personality

# The prefix of qmpjobd's own test controls: they exist in no QEMU release.
TEST_CONTROL_PREFIX = "x-qmpjobd-"

# What a QMP request object may hold besides the command name (QEMU refuses any
# other member with "QMP input member '...' is unexpected").
REQUEST_MEMBERS = ("execute", "exec-oob", "arguments", "id", "control")


class InvalidCommand(ValueError):
    """A command the chosen QEMU version would refuse; ``errors`` lists why."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@functools.lru_cache(maxsize=None)
def _document(version: str, test_controls: bool = False) -> dict:
    """The derived JSON Schema of QEMU ``version`` (with the test controls'
    definitions too when asked), as the daemon of that setup would load it."""
    from qmpjobd.cli import load_schema

    return load_schema(version, test_controls).json_schema()


@functools.lru_cache(maxsize=None)
def _validator(version: str, test_controls: bool, command: str) -> Any:
    """A jsonschema validator of one command's arguments (built once)."""
    import jsonschema

    from qmpjobd.qapi.jsonschema import command_schema

    # QMP integers are JSON integers: QEMU refuses 1.0 where it wants an int,
    # while jsonschema's default type checker counts 1.0 as an integer.
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: type(value) is int)
    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    return strict(command_schema(_document(version, test_controls), command))


def _known_version(version: str) -> str:
    return personality(version).version


def command_errors(command: Mapping | str, version: str = DEFAULT_VERSION,
                   test_controls: bool = False) -> list[str]:
    """Why ``command`` (a request object, or its JSON text) is not a valid command
    of QEMU ``version``; empty when it is. ``test_controls`` also accepts
    qmpjobd's ``x-qmpjobd-*`` commands (they exist in no QEMU)."""
    version = _known_version(version)
    if isinstance(command, (str, bytes)):
        try:
            command = json.loads(command)
        except ValueError as exc:
            return [f"not JSON: {exc}"]
    if not isinstance(command, Mapping):
        return [f"a command is a JSON object, not {type(command).__name__}"]
    problems = _request_problems(command)
    if problems:
        return problems
    name = command.get("execute", command.get("exec-oob"))
    if name.startswith(TEST_CONTROL_PREFIX) and not test_controls:
        return [f"{name}: a qmpjobd test control, not a command of QEMU {version}"]
    if name not in _document(version, test_controls)["properties"]:
        return [f"{name}: no such command in QEMU {version} (as qmpjobd's schema describes it)"]
    arguments = command.get("arguments", {})
    validator = _validator(version, test_controls, name)
    return [_describe(name, error) for error in _best_errors(validator, arguments)]


def _request_problems(command: Mapping) -> list[str]:
    """The request object's own shape, before its arguments."""
    unexpected = [key for key in command if key not in REQUEST_MEMBERS]
    if unexpected:
        return [f"unexpected request member '{key}'" for key in unexpected]
    names = [key for key in ("execute", "exec-oob") if key in command]
    if len(names) != 1:
        return ["a command has exactly one of 'execute' and 'exec-oob'"]
    if not isinstance(command[names[0]], str):
        return [f"'{names[0]}' must be a string"]
    if "arguments" in command and not isinstance(command["arguments"], Mapping):
        return [f"{command[names[0]]}: 'arguments' must be an object"]
    return []


def _best_errors(validator: Any, arguments: Mapping) -> list[tuple[str, str]]:
    """The most specific problem, as (path, message). A flat union's error is
    narrowed to the branch its discriminator selects (a wrong ``driver`` member
    reads as one enum message, a bad member of the ``null-co`` branch as that
    member's message), where jsonschema alone would say "not valid under any of
    the given schemas"."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(arguments))
    if error is None:
        return []
    return [_narrow(error)]


def _narrow(error: Any) -> tuple[str, str]:
    from jsonschema.exceptions import best_match

    while error.validator == "oneOf" and error.context:
        tag = error.schema.get("x-qapi-discriminator")
        if tag is None:   # an alternate: jsonschema's relevance order decides
            error = best_match(error.context)
            continue
        branches = error.schema["oneOf"]
        value = error.instance.get(tag) if isinstance(error.instance, Mapping) else None
        chosen = [i for i, branch in enumerate(branches)
                  if branch.get("properties", {}).get(tag, {}).get("const") == value]
        if not chosen:
            if value is None:
                return _path(error), f"'{tag}' is a required property"
            values = [branch["properties"][tag]["const"] for branch in branches]
            return _path(error, tag), f"{value!r} is not one of {values!r}"
        inside = [e for e in error.context if e.relative_schema_path[0] == chosen[0]]
        error = best_match(inside)
    return _path(error), error.message


def _path(error: Any, *more: str) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                   for part in (*error.absolute_path, *more))


def _describe(command: str, problem: tuple[str, str]) -> str:
    where, message = problem
    return f"{command}: arguments{where}: {message}"


def validate(command: Mapping | str, version: str = DEFAULT_VERSION,
             test_controls: bool = False) -> None:
    """Raise ``InvalidCommand`` unless ``command`` is valid for QEMU ``version``."""
    errors = command_errors(command, version, test_controls)
    if errors:
        raise InvalidCommand(errors)


@dataclass(frozen=True)
class Line:
    """One command found in a file, with where it was."""

    number: int
    text: str


def parse_line(raw: str) -> str | None:
    """The command text on one line of a commands file, or None for a line that
    holds no command. A line is one of:

    * empty, or a comment starting with ``#``: no command;
    * a JSON object: a command;
    * a transcript line ``-> {...}``, optionally numbered ``[N] -> {...}`` (what a
      client sent, as the conformance transcripts write it): a command;
    * ``<- ...`` (optionally numbered): what a client received, no command.

    Anything else is returned as is, so that it is reported as not a command.
    """
    text = raw.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("["):
        number, sep, rest = text.partition("]")
        if sep and number[1:].strip().isdigit():
            text = rest.strip()
    if text.startswith("<-"):
        return None
    if text.startswith("->"):
        return text[2:].strip()
    return text


def read_commands(lines: list[str]) -> Iterator[Line]:
    for number, raw in enumerate(lines, start=1):
        text = parse_line(raw)
        if text is not None:
            yield Line(number, text)


def check_lines(lines: list[str], version: str, test_controls: bool = False) -> tuple[int, list[str]]:
    """(commands checked, one message per bad command: ``LINE: message``)."""
    checked = 0
    bad: list[str] = []
    for line in read_commands(lines):
        checked += 1
        errors = command_errors(line.text, version, test_controls)
        if errors:
            bad.append(f"{line.number}: {'; '.join(errors)}")
    return checked, bad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmpjobd check-commands",
        description="Validate QMP commands (one JSON object per line, or a transcript "
        "with '-> {...}' lines) against the JSON Schema of a QEMU version.")
    parser.add_argument("file", metavar="FILE", help="the commands file ('-' reads standard input)")
    parser.add_argument("--qemu-version", default=DEFAULT_VERSION, choices=KNOWN_VERSIONS,
                        help=f"the QEMU version whose schema applies (default {DEFAULT_VERSION})")
    parser.add_argument("--test-controls", action="store_true",
                        help="also accept qmpjobd's x-qmpjobd-* test controls")
    return parser


def check_commands_main(argv: list[str]) -> int:
    """``qmpjobd check-commands``: 0 when every command is valid, 1 when one is
    not (one line each on stdout, ``FILE:LINE: message``), 2 for a usage error."""
    args = build_parser().parse_args(argv)
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"qmpjobd check-commands: {args.file}: {exc}", file=sys.stderr)
        return 2
    checked, bad = check_lines(lines, args.qemu_version, args.test_controls)
    for message in bad:
        print(f"{args.file}:{message}")
    print(f"{checked} command(s) checked against QEMU {args.qemu_version}, {len(bad)} invalid",
          file=sys.stderr)
    return 1 if bad else 0
