"""qmpjobd.testing.validate and ``qmpjobd check-commands``: commands checked with
jsonschema against the JSON Schema of one QEMU version.

The verdicts are checked against the real qemu-storage-daemon 7.2 (a command it
refuses with an argument-checking error must be refused here, and one it accepts
or refuses for another reason must pass), and the command names of each version
against the oracles' recorded query-commands.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qmpjobd.testing import InvalidCommand, command_errors, validate
from qmpjobd.testing.schema_check import check_commands_main, parse_line
from qmpjobd.versions import KNOWN_VERSIONS
from tests.support.daemons import REPO, DaemonProcess, RawClient

DATA = REPO / "tests" / "data"

BACKUP = {"execute": "blockdev-backup",
          "arguments": {"job-id": "b0", "device": "src", "target": "tgt", "sync": "full"}}


def args_of(command: str, **arguments: object) -> dict:
    return {"execute": command, "arguments": arguments}


def test_a_valid_command_passes_in_every_version() -> None:
    for version in KNOWN_VERSIONS:
        assert command_errors(BACKUP, version) == []
        validate(BACKUP, version)


def test_messages_name_the_member_and_give_jsonschemas_reason() -> None:
    bad_enum = args_of("blockdev-backup", device="s", target="t", sync="fulll")
    (message,) = command_errors(bad_enum, "7.2")
    assert message.startswith("blockdev-backup: arguments.sync: 'fulll' is not one of [")
    (missing,) = command_errors(args_of("blockdev-backup", device="s", target="t"), "7.2")
    assert missing == "blockdev-backup: arguments: 'sync' is a required property"
    (extra,) = command_errors(args_of("query-jobs", bogus=1), "7.2")
    assert "'bogus' was unexpected" in extra


def test_a_union_error_is_reported_inside_the_branch_its_discriminator_picks() -> None:
    (wrong_member,) = command_errors(args_of("blockdev-add", **{"driver": "null-co", "node-name": "n",
                                                              "size": "big"}), "7.2")
    assert wrong_member == "blockdev-add: arguments.size: 'big' is not of type 'integer'"
    (wrong_driver,) = command_errors(args_of("blockdev-add", **{"driver": "nul-co", "node-name": "n"}), "7.2")
    assert wrong_driver.startswith("blockdev-add: arguments.driver: 'nul-co' is not one of [")
    nested = args_of("transaction", actions=[{"type": "blockdev-backup", "data": {
        "device": "s", "target": "t", "sync": "x"}}])
    (inside,) = command_errors(nested, "7.2")
    assert inside.startswith("transaction: arguments.actions[0].data.sync: 'x' is not one of [")


def test_a_float_is_not_an_integer_as_in_qmp() -> None:
    command = args_of("block-job-set-speed", device="j", speed=1.0)
    assert command_errors(command, "7.2") == [
        "block-job-set-speed: arguments.speed: 1.0 is not of type 'integer'"]
    assert command_errors(args_of("block-job-set-speed", device="j", speed=1), "7.2") == []


def test_request_object_shape() -> None:
    assert command_errors({"execute": "query-jobs", "id": 7}) == []
    assert command_errors({"exec-oob": "query-jobs"}) == []
    assert command_errors({"execute": "query-jobs", "foo": 1}) == ["unexpected request member 'foo'"]
    assert command_errors({"arguments": {}}) == ["a command has exactly one of 'execute' and 'exec-oob'"]
    assert command_errors({"execute": 3}) == ["'execute' must be a string"]
    assert command_errors({"execute": "query-jobs", "arguments": []}) == [
        "query-jobs: 'arguments' must be an object"]
    assert command_errors("[1]") == ["a command is a JSON object, not list"]
    assert command_errors("{").pop().startswith("not JSON: ")


def test_validate_raises_with_every_message() -> None:
    with pytest.raises(InvalidCommand) as raised:
        validate({"execute": "no-such-command"}, "7.2")
    assert raised.value.errors == [
        "no-such-command: no such command in QEMU 7.2 (as qmpjobd's schema describes it)"]


def test_test_controls_are_no_qemu_commands() -> None:
    (message,) = command_errors({"execute": "x-qmpjobd-clock-query"}, "11.1")
    assert message == "x-qmpjobd-clock-query: a qmpjobd test control, not a command of QEMU 11.1"


def test_an_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError):
        command_errors(BACKUP, "6.0")


@pytest.mark.parametrize("version", KNOWN_VERSIONS)
def test_no_command_passes_that_the_real_daemon_lacks(version: str) -> None:
    recorded = json.loads((DATA / f"qsd-{version}-commands.json").read_text())
    real = {entry["name"] for entry in recorded}
    from qmpjobd.testing.schema_check import _document

    ours = set(_document(version)["properties"])
    for name in sorted(ours | {"blockdev-set-active", "block-job-change", "chardev-add"}):
        verdict = command_errors({"execute": name}, version)
        unknown = any("no such command" in message for message in verdict)
        assert unknown == (name not in ours), (name, verdict)
        if not unknown:
            assert name in real, f"{name} passes for {version} but qsd {version} lacks it"


# Replies of qemu-storage-daemon that come from its argument checking (the QAPI
# input visitor), as opposed to the command refusing valid arguments.
SCHEMA_ERROR = re.compile(r"Invalid parameter type for|Parameter '[^']*' (expects|is missing|"
                          r"is unexpected|does not accept value)|QMP input member")

# Each is played against qsd 7.2; what it says decides what validate() must say.
ORACLE_COMMANDS = [
    {"execute": "query-jobs"},
    {"execute": "query-jobs", "arguments": {"x": 1}},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    {"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}},
    {"execute": "job-pause", "arguments": {"id": "nope"}},
    {"execute": "job-pause", "arguments": {}},
    {"execute": "job-pause", "arguments": {"id": 5}},
    {"execute": "block-job-set-speed", "arguments": {"device": "nope", "speed": 1}},
    {"execute": "block-job-set-speed", "arguments": {"device": "nope", "speed": 1.5}},
    {"execute": "blockdev-backup", "arguments": {"device": "nope", "target": "t", "sync": "full"}},
    {"execute": "blockdev-backup", "arguments": {"device": "nope", "target": "t", "sync": "fulll"}},
    {"execute": "blockdev-backup", "arguments": {"device": "nope", "target": "t"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "ok0", "size": 4096}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1", "size": "big"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n2", "sise": 1}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file"}}},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": []}},
    {"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {
        "device": "s", "target": "t", "sync": "nope"}}]}},
    {"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-backup", "data": {
        "device": "s", "target": "t", "sync": "full"}}]}},
    {"execute": "query-jobs", "bogus": 1},
]


def test_verdicts_match_qemu_storage_daemon_7_2() -> None:
    with DaemonProcess("qsd", []) as qsd:
        client = RawClient(qsd.sockets[0])
        client.recv_message()
        client.send(b'{"execute":"qmp_capabilities"}')
        client.recv_message()
        verdicts = set()
        for command in ORACLE_COMMANDS:
            client.send(json.dumps({**command, "id": "probe"}))
            reply = next(m for m in map(json.loads, iter(client.recv_message, None))
                         if m.get("id") == "probe")
            qemu_refused_arguments = "error" in reply and bool(SCHEMA_ERROR.search(reply["error"]["desc"]))
            ours = command_errors(command, "7.2")
            assert bool(ours) == qemu_refused_arguments, (command, reply, ours)
            verdicts.add(qemu_refused_arguments)
        client.sock.close()
    assert verdicts == {True, False}, "the probes must include both kinds"


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "commands.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_line_formats() -> None:
    assert parse_line("") is None
    assert parse_line("   # a comment") is None
    assert parse_line('{"execute":"query-jobs"}') == '{"execute":"query-jobs"}'
    assert parse_line('-> {"execute":"query-jobs"}') == '{"execute":"query-jobs"}'
    assert parse_line('[12] -> {"execute":"query-jobs"}') == '{"execute":"query-jobs"}'
    assert parse_line('<- {"return": {}}') is None
    assert parse_line('[3] <- {"return": {}}') is None
    assert parse_line("hello") == "hello"


def test_check_commands_reports_line_numbers_and_exit_status(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, [
        "# generated by the management layer",
        json.dumps(BACKUP),
        "",
        '-> {"execute": "job-pause", "arguments": {"id": 5}}',
        '<- {"error": {"class": "GenericError", "desc": "x"}}',
        '[7] -> {"execute": "query-jobs"}',
        "not a command",
    ])
    assert check_commands_main([str(path), "--qemu-version", "7.2"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{path}:4: job-pause: arguments.id: 5 is not of type 'string'",
        f"{path}:7: not JSON: Expecting value: line 1 column 1 (char 0)",
    ]
    assert "4 command(s) checked against QEMU 7.2, 2 invalid" in out.err


def test_check_commands_all_valid_is_status_0(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, [json.dumps(BACKUP), '{"execute":"query-jobs"}'])
    assert check_commands_main([str(path)]) == 0
    assert capsys.readouterr().out == ""


def test_check_commands_missing_file_is_status_2(tmp_path: Path, capsys) -> None:
    assert check_commands_main([str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err


def test_check_commands_is_a_subcommand_of_the_qmpjobd_program(tmp_path: Path) -> None:
    path = write(tmp_path, ['{"execute": "blockdev-backup", "arguments": {"device": "s", "sync": "full"}}'])
    result = subprocess.run([sys.executable, "-m", "qmpjobd", "check-commands", str(path),
                             "--qemu-version", "10.0"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert result.stdout == (f"{path}:1: blockdev-backup: arguments: 'target' is a required property\n")
    # Only as the first argument: elsewhere it is no option of the daemon.
    daemon = subprocess.run([sys.executable, "-m", "qmpjobd", "--socket", str(tmp_path / "s"),
                             "check-commands"], capture_output=True, text=True, cwd=REPO)
    assert daemon.returncode != 0 and "unrecognized arguments: check-commands" in daemon.stderr


def test_test_controls_are_checked_when_asked_for() -> None:
    fault = {"execute": "x-qmpjobd-job-fault", "arguments": {"id": "j0", "phase": "prepare"}}
    assert command_errors(fault, "7.2", test_controls=True) == []
    (typo,) = command_errors({**fault, "arguments": {"id": "j0", "phase": "prepair"}}, "7.2",
                             test_controls=True)
    assert typo.startswith("x-qmpjobd-job-fault: arguments.phase: 'prepair' is not one of [")
    # QEMU's commands are checked as without the controls.
    assert command_errors(BACKUP, "7.2", test_controls=True) == []


def test_check_commands_accepts_test_controls_with_the_option(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, ['{"execute": "x-qmpjobd-clock-step", "arguments": {"ns": 1000}}'])
    assert check_commands_main([str(path)]) == 1
    assert check_commands_main([str(path), "--test-controls"]) == 0
