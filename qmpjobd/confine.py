"""Path confinement (``--allow-dir``): every file the daemon opens or creates must lie
inside one of a few directories.

QEMU has no such rule: a client may open any path the daemon's user can. qmpjobd
offers it for less trusted clients. With no allowed directory (the default) nothing is
confined and :meth:`PathPolicy.open` is a plain ``open(2)``, exactly as in QEMU.

What "inside" means: the path, made absolute against the daemon's working directory
(as QEMU resolves relative names) and with every symlink and ``..`` resolved, lies
strictly below an allowed directory (an allowed directory itself names no file). The
allowed directories are resolved once, when the policy is built, so renaming a symlink
later cannot move them.

Checking a name and then opening it is racy: between the two, a client that can write
inside an allowed directory could replace a directory or the file itself by a symlink
to ``/etc``. :meth:`PathPolicy.open` therefore never opens the name as given:

1. it resolves the name and checks the result (``check_open``/``check_create``);
2. it opens the resolved *parent* directory with ``O_PATH | O_DIRECTORY`` and asks the
   kernel where that descriptor really is (``/proc/self/fd/N``); a parent swapped for a
   symlink since step 1 shows up there as a place outside, and nothing outside was
   touched;
3. it opens the last component relative to that pinned directory with ``O_NOFOLLOW``,
   so a final component swapped for a symlink fails (ELOOP) instead of being followed;
4. it asks the kernel again where the opened file is, and closes it if that is outside.

Step 2 means no file outside is ever opened or created, so opening has no side effect
there (a device's open, ``O_CREAT``). Hard links are not symlinks: a hard link inside an
allowed directory is a file inside it (the kernel's ``protected_hardlinks`` keeps users
from linking files they do not own). Without ``/proc``, steps 2 and 4 compare device
and inode numbers with a fresh resolution instead, which narrows the race but cannot
close it; Linux always has ``/proc`` in practice.
"""

from __future__ import annotations

import os
from typing import Iterable

from qmpjobd.errors import QMPError

# O_PATH pins a directory without needing read permission on it (Linux); elsewhere a
# plain read-only open of the directory does the same job.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def outside_error(path: str) -> QMPError:
    """The one error every refusal gives, naming the path as the client wrote it."""
    return QMPError(f"Path '{path}' is outside the allowed directories")


class PathPolicy:
    """The allowed directories, resolved, and the checks that use them."""

    def __init__(self, allowed_dirs: Iterable[str] = ()) -> None:
        self.requested: tuple[str, ...] = tuple(allowed_dirs)
        self.roots: tuple[str, ...] = tuple(_resolve_root(d) for d in self.requested)

    @property
    def confined(self) -> bool:
        return bool(self.roots)

    # --- checks on names -------------------------------------------------------------

    @staticmethod
    def resolve(path: str) -> str:
        """Absolute (against the working directory), symlinks and ``..`` resolved as far
        as the path exists; the missing rest is appended as written."""
        return os.path.realpath(path)

    def check_open(self, path: str) -> str:
        """Raise the outside error unless ``path`` resolves inside; return the resolved
        path. An unconfined policy returns ``path`` unchanged."""
        if not self.confined:
            return path
        resolved = self.resolve(path)
        if not self.is_inside(resolved):
            raise outside_error(path)
        return resolved

    def check_create(self, path: str) -> str:
        """As :meth:`check_open`, for a file that may not exist yet: its parent is
        resolved, and a final component that is a symlink (even a dangling one) is
        followed to where the file would be created, which must be inside too."""
        # realpath resolves the existing prefix and follows a final symlink, so the
        # rule for creation is the same as for opening; kept as its own entry point so
        # that callers say what they do.
        return self.check_open(path)

    def is_inside(self, resolved: str) -> bool:
        """True when an already resolved absolute path lies strictly below a root."""
        return any(_is_below(resolved, root) for root in self.roots)

    def _is_inside_or_root(self, resolved: str) -> bool:
        return resolved in self.roots or self.is_inside(resolved)

    # --- opening ---------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644, *, create: bool = False) -> int:
        """``os.open`` under the policy; see the module docstring for the steps.

        Raises QMPError (outside) before touching anything outside, OSError for what
        the open itself reports (the caller words it, as QEMU does). ``create`` says
        the caller creates the file (``O_CREAT``); it selects ``check_create``.
        """
        if not self.confined:
            return os.open(path, flags, mode)
        resolved = self.check_create(path) if create else self.check_open(path)
        parent, name = os.path.split(resolved)
        if not name:  # "/" itself: only reachable when "/" is allowed, names no file
            raise outside_error(path)
        dir_fd = os.open(parent, _DIR_FLAGS)
        try:
            if not self._is_inside_or_root(_where_is(dir_fd, parent)):
                raise outside_error(path)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            if not self.is_inside(_where_is(fd, resolved)):
                raise outside_error(path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check_fd(self, fd: int, path: str) -> None:
        """Raise the outside error unless the open descriptor ``fd`` (opened by its
        owner as ``path``) lies inside; for descriptors not opened by :meth:`open`."""
        if self.confined and not self.is_inside(_where_is(fd, self.resolve(path))):
            raise outside_error(path)


def _resolve_root(directory: str) -> str:
    resolved = os.path.realpath(directory)
    if not os.path.isdir(resolved):
        raise ValueError(f"allowed directory '{directory}' is not a directory")
    return resolved


def _is_below(resolved: str, root: str) -> bool:
    if root == os.sep:
        return resolved != os.sep
    return resolved.startswith(root + os.sep)


def _where_is(fd: int, expected: str) -> str:
    """The absolute path of the file behind ``fd``, as the kernel knows it.

    A descriptor that is not a file of the tree (a pipe, an anonymous inode) gives a
    name like ``pipe:[123]``, which no root contains. Without /proc: ``expected`` if
    it still resolves to the same inode, else a name no root contains.
    """
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return _where_without_proc(fd, expected)
    # An unlinked file reads back with this suffix; its directory is still telling.
    return where.removesuffix(" (deleted)")


def _where_without_proc(fd: int, expected: str) -> str:
    try:
        same = (os.path.realpath(expected) == expected
                and os.path.samestat(os.fstat(fd), os.stat(expected)))
    except OSError:
        same = False
    return expected if same else "<unknown>"
