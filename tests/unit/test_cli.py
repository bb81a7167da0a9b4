"""The command-line parser: qemu-storage-daemon syntax and our shorthands."""

from __future__ import annotations

import pytest

from qmpjobd.cli import UsageError, parse_args, split_keyval


def test_keyval_implied_key_and_escaped_commas():
    assert split_keyval("socket,id=c0,path=/a,,b", "backend") == {"backend": "socket", "id": "c0", "path": "/a,b"}
    assert split_keyval("chardev=c1,pretty=on", "chardev") == {"chardev": "c1", "pretty": "on"}


@pytest.mark.parametrize("text", ["a=1,a=2", "x=1,bare"])
def test_keyval_errors(text):
    with pytest.raises(UsageError):
        split_keyval(text, "k")


def test_qsd_style_chardev_and_monitor_pairs():
    config = parse_args([
        "--chardev", "socket,id=c0,path=/tmp/a.sock,server=on,wait=off",
        "--chardev", "socket,id=c1,host=127.0.0.1,port=4444,server=on,wait=off",
        "--monitor", "chardev=c0", "--monitor", "c1,pretty=on",
    ])
    unix, tcp = config.monitors
    assert (unix.path, unix.pretty) == ("/tmp/a.sock", False)
    assert (tcp.host, tcp.port, tcp.pretty) == ("127.0.0.1", 4444, True)


def test_shorthands_default_to_loopback():
    config = parse_args(["--socket", "/tmp/s", "--tcp", "5555", "--tcp", "0.0.0.0:6666", "--pretty"])
    assert [(m.path, m.host, m.port, m.pretty) for m in config.monitors] == [
        ("/tmp/s", None, None, True), (None, "127.0.0.1", 5555, True), (None, "0.0.0.0", 6666, True)]


def test_options():
    config = parse_args(["--socket", "s", "--no-drain-artefacts", "--max-output-bytes", "1000",
                         "--blockdev", "null-co,node-name=n", "--pidfile", "p", "--demo"])
    assert not config.drain_artefacts and config.max_output_bytes == 1000
    assert config.blockdevs == ["null-co,node-name=n"] and config.pidfile == "p" and config.demo


@pytest.mark.parametrize("argv, message", [
    (["--chardev", "socket,id=c0,path=/x,server=off,wait=off"], "server=on"),
    (["--chardev", "socket,id=c0,path=/x,server=on"], "wait=off"),
    (["--chardev", "socket,path=/x,server=on,wait=off"], "'id' is missing"),
    (["--chardev", "socket,id=c0,server=on,wait=off"], "needs either 'path' or 'port'"),
    (["--chardev", "socket,id=c0,port=99999,server=on,wait=off"], "invalid port"),
    (["--chardev", "socket,id=c0,path=/x,server=on,wait=off", "--chardev", "socket,id=c0,path=/y,server=on,wait=off"], "duplicate"),
    (["--daemonize"], "not supported"),
    (["--monitor", "c0,pretty=maybe", "--chardev", "socket,id=c0,path=/x,server=on,wait=off"], "expects 'on' or 'off'"),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)
