"""Every supported QEMU version's real qemu-storage-daemon runs and is that version.

These are the oracles the conformance suite compares qmpjobd with; a missing or
wrong one fails here (never skips), with the command that `make oracle` runs.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.daemons import DaemonProcess, RawClient
from tests.support.oracles import (CONFORMANCE_VERSIONS, SUPPORTED_VERSIONS, oracle_command,
                                   oracle_roots, oracle_version,
                                   qemu_img_command)


def series(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_oracle_greets_as_its_version(version):
    with DaemonProcess("qsd", version=version) as daemon:
        client = RawClient(daemon.sockets[0])
        try:
            greeting = json.loads(client.recv_message())
            client.send('{"execute": "qmp_capabilities"}')
            assert json.loads(client.recv_message()) == {"return": {}}
            client.send('{"execute": "query-version"}')
            reply = json.loads(client.recv_message())["return"]
        finally:
            client.close()
    qemu = greeting["QMP"]["version"]["qemu"]
    assert (qemu["major"], qemu["minor"]) == series(version)
    assert reply == greeting["QMP"]["version"]
    # The header of the run printed this exact version; it is the running one.
    assert f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}" == oracle_version(version)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_qemu_img_is_its_version(version, tmp_path):
    image = tmp_path / "probe.raw"
    subprocess.run(qemu_img_command(version) + ["create", "-q", "-f", "raw", str(image), "1M"],
                   check=True)
    done = subprocess.run(qemu_img_command(version) + ["--version"], capture_output=True,
                          text=True, check=True)
    assert f"version {oracle_version(version)} " in done.stdout
    assert image.stat().st_size == 1 << 20


def test_conformance_versions_are_supported():
    assert CONFORMANCE_VERSIONS and set(CONFORMANCE_VERSIONS) <= set(SUPPORTED_VERSIONS)


def test_unknown_version_is_refused():
    with pytest.raises(ValueError, match="supported: 7.2, 10.0, 11.1"):
        DaemonProcess("qsd", version="9.9").argv()


# How scripts/oracle_roots.py finds the archive and decides what is usable.

SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def fake_host(tmp_path, sources: str, codename: str = "bookworm"):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(sources)
    os_release = tmp_path / "os-release"
    os_release.write_text(f'PRETTY_NAME="Debian"\nVERSION_CODENAME={codename}\n')
    return apt, os_release


def test_mirror_is_the_source_of_the_hosts_release(tmp_path, monkeypatch):
    monkeypatch.delenv("QMPJOBD_DEBIAN_MIRROR", raising=False)
    apt, os_release = fake_host(tmp_path, SOURCES)
    assert oracle_roots().debian_mirror(apt, os_release) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_and_disabled_stanzas(tmp_path, monkeypatch):
    monkeypatch.delenv("QMPJOBD_DEBIAN_MIRROR", raising=False)
    disabled = SOURCES.replace("Components: main\nSigned-By", "Enabled: no\nSigned-By", 1)
    assert "Enabled: no" in disabled
    apt, os_release = fake_host(tmp_path, disabled)
    (apt / "sources.list").write_text("# deb http://commented/ bookworm main\n"
                                      "deb [arch=amd64] http://list.example/debian bookworm main\n")
    assert oracle_roots().debian_mirror(apt, os_release) == "http://list.example/debian"


def test_no_source_for_the_release_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("QMPJOBD_DEBIAN_MIRROR", raising=False)
    apt, os_release = fake_host(tmp_path, SOURCES, codename="trixie")
    with pytest.raises(SystemExit, match="no apt source serves 'trixie'"):
        oracle_roots().debian_mirror(apt, os_release)


def test_half_built_root_is_never_used(tmp_path, monkeypatch):
    # An interrupted build leaves a .build-* directory, or (from an older layout) a
    # root without its completion marker: neither counts as an installed oracle.
    monkeypatch.setenv("QMPJOBD_ORACLE_CACHE", str(tmp_path))
    (tmp_path / ".build-x" / "root-10.0" / "usr/bin").mkdir(parents=True)
    (tmp_path / "10.0" / "usr/bin").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="10.0 is not installed"):
        oracle_command("10.0")
    (tmp_path / "10.0" / ".qmpjobd-oracle.json").write_text("{}")
    command = oracle_command("10.0")
    assert command[0] == str(tmp_path / "10.0" / "lib64/ld-linux-x86-64.so.2")
    assert command[-1] == str(tmp_path / "10.0" / "usr/bin/qemu-storage-daemon")
