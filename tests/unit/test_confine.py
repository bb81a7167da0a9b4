"""PathPolicy (qmpjobd.confine): what resolves inside, and the race-proof open."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from qmpjobd.confine import PathPolicy
from qmpjobd.errors import QMPError


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """allowed/ (with a file, a subdirectory and symlinks) next to outside/."""
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "img").write_bytes(b"inside")
    (outside / "secret").write_bytes(b"outside")
    (allowed / "to-img").symlink_to(allowed / "img")
    (allowed / "to-secret").symlink_to(outside / "secret")
    (allowed / "to-outside-dir").symlink_to(outside)
    (allowed / "dangling-out").symlink_to(outside / "new")
    (allowed / "dangling-in").symlink_to(allowed / "new")
    return {"allowed": allowed, "outside": outside}


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(QMPError) as info:
        call(*args, **kwargs)
    assert info.value.error_class == "GenericError"
    return info.value.desc


def test_unconfined_policy_changes_nothing(tree) -> None:
    policy = PathPolicy()
    assert not policy.confined
    secret = str(tree["outside"] / "secret")
    assert policy.check_open(secret) == secret
    fd = policy.open(secret, os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"outside"
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["img", "to-img", "sub/../img", "sub/new", "dangling-in"])
def test_names_that_resolve_inside_pass(tree, name) -> None:
    allowed = tree["allowed"]
    policy = PathPolicy([str(allowed)])
    assert policy.check_create(str(allowed / name)).startswith(str(allowed) + os.sep)


@pytest.mark.parametrize("name", ["to-secret", "to-outside-dir/secret", "../outside/secret",
                                  "sub/../../outside/secret", "dangling-out", "to-outside-dir/new"])
def test_names_that_resolve_outside_are_refused_naming_the_path(tree, name) -> None:
    path = str(tree["allowed"] / name)
    policy = PathPolicy([str(tree["allowed"])])
    assert refused(policy.check_open, path) == f"Path '{path}' is outside the allowed directories"
    assert refused(policy.check_create, path) == f"Path '{path}' is outside the allowed directories"
    assert refused(policy.open, path, os.O_RDONLY).startswith(f"Path '{path}'")


def test_the_allowed_directory_itself_and_its_parent_are_outside(tree) -> None:
    allowed = tree["allowed"]
    policy = PathPolicy([str(allowed)])
    assert not policy.is_inside(str(allowed))
    assert not policy.is_inside(str(allowed.parent))
    # A sibling sharing the prefix is not inside: "/x/allowed-2" vs "/x/allowed".
    assert not policy.is_inside(str(allowed) + "-2/file")


def test_relative_paths_resolve_against_the_working_directory(tree, monkeypatch) -> None:
    policy = PathPolicy([str(tree["allowed"])])
    monkeypatch.chdir(tree["allowed"] / "sub")
    assert policy.check_open("../img") == str(tree["allowed"] / "img")
    assert refused(policy.check_open, "../../outside/secret").startswith("Path '../../outside/secret'")


def test_allowed_directories_are_resolved_once(tree, tmp_path) -> None:
    link = tmp_path / "link-to-allowed"
    link.symlink_to(tree["allowed"])
    policy = PathPolicy([str(link)])
    assert policy.roots == (str(tree["allowed"]),)
    # Re-pointing the symlink later does not move the confinement.
    link.unlink()
    link.symlink_to(tree["outside"])
    refused(policy.check_open, str(link / "secret"))


def test_an_allowed_directory_must_exist(tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        PathPolicy([str(tmp_path / "missing")])


def test_open_creates_inside_and_reads_back(tree) -> None:
    policy = PathPolicy([str(tree["allowed"])])
    fd = policy.open(str(tree["allowed"] / "dangling-in"), os.O_RDWR | os.O_CREAT, 0o600,
                     create=True)
    os.close(fd)
    # The dangling symlink was followed, as open(2) would: the file is its target.
    assert (tree["allowed"] / "new").is_file()


def test_open_outside_touches_nothing(tree) -> None:
    policy = PathPolicy([str(tree["allowed"])])
    refused(policy.open, str(tree["allowed"] / "dangling-out"), os.O_RDWR | os.O_CREAT,
            create=True)
    assert not (tree["outside"] / "new").exists()


def test_open_reports_os_errors_as_oserror(tree) -> None:
    policy = PathPolicy([str(tree["allowed"])])
    with pytest.raises(FileNotFoundError):
        policy.open(str(tree["allowed"] / "missing"), os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        policy.open(str(tree["allowed"] / "nodir" / "x"), os.O_RDONLY)


def test_a_symlink_swapped_in_after_the_check_does_not_escape(tree, monkeypatch) -> None:
    """The race: the name is checked while it is a plain directory, then replaced by
    a symlink to outside before the open. The pinned directory shows where it is."""
    allowed, outside = tree["allowed"], tree["outside"]
    victim = allowed / "swap"
    victim.mkdir()
    (victim / "secret").write_bytes(b"decoy")
    policy = PathPolicy([str(allowed)])
    real_check = PathPolicy.check_open

    def check_then_swap(self, path):
        resolved = real_check(self, path)
        (victim / "secret").unlink()
        victim.rmdir()
        victim.symlink_to(outside)       # now swap/secret is outside/secret
        return resolved

    monkeypatch.setattr(PathPolicy, "check_open", check_then_swap)
    assert refused(policy.open, str(victim / "secret"), os.O_RDONLY).startswith("Path '")


def test_a_final_symlink_swapped_in_after_the_check_is_not_followed(tree, monkeypatch) -> None:
    allowed, outside = tree["allowed"], tree["outside"]
    victim = allowed / "plain"
    victim.write_bytes(b"decoy")
    policy = PathPolicy([str(allowed)])
    real_check = PathPolicy.check_open

    def check_then_swap(self, path):
        resolved = real_check(self, path)
        victim.unlink()
        victim.symlink_to(outside / "secret")
        return resolved

    monkeypatch.setattr(PathPolicy, "check_open", check_then_swap)
    with pytest.raises(OSError) as info:   # O_NOFOLLOW: ELOOP, nothing read
        policy.open(str(victim), os.O_RDONLY)
    assert info.value.errno == errno.ELOOP


def test_check_fd_locates_a_descriptor(tree) -> None:
    policy = PathPolicy([str(tree["allowed"])])
    inside = os.open(tree["allowed"] / "img", os.O_RDONLY)
    outside = os.open(tree["outside"] / "secret", os.O_RDONLY)
    try:
        policy.check_fd(inside, str(tree["allowed"] / "img"))
        refused(policy.check_fd, outside, "whatever")
    finally:
        os.close(inside)
        os.close(outside)
