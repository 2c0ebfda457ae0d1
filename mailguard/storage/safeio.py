"""The durable-write primitives every store uses, in one place.

A write is durable when its data and the directory entry naming it are on disk.
The recipe (``maildir(5)``; the same for the queue): write the file under a name no
reader looks at, make its data durable, ``rename`` it to its final name, make the
directory durable.  This module holds those steps and nothing else, so the order
can be observed where it happens: :func:`fsync`, :func:`fsync_dir`, :func:`syncfs`
and :func:`rename` are the only places the storage code syncs or publishes, and
callers reach them as ``safeio.NAME`` (never imported by name), so a test may
record them.

``syncfs(2)`` (Linux) makes everything written on one filesystem durable with one
journal commit: the group commit uses it to cover a whole batch of files and
renames.  :data:`HAVE_SYNCFS` says whether it could be loaded.

Everything here blocks: call it from a thread, never from the reactor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable, Union, cast

StrPath = Union[str, "os.PathLike[str]"]

FILE_MODE = 0o600


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


_SYNCFS = _load_syncfs()

#: True when :func:`syncfs` is available (Linux).
HAVE_SYNCFS = _SYNCFS is not None


def fsync(fd: int) -> None:
    """Make the data of the open file ``fd`` durable."""
    os.fsync(fd)


def fsync_dir(path: StrPath) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: StrPath) -> None:
    """Make everything written on the filesystem holding ``path`` durable (``syncfs(2)``).

    :raises OSError: the sync failed, or ``syncfs`` is not available here.
    """
    if _SYNCFS is None:
        raise OSError(38, "syncfs is not available")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def rename(src: StrPath, dst: StrPath) -> None:
    """Publish ``src`` under the name ``dst`` (atomic within one filesystem)."""
    os.rename(src, dst)


def unlink_quietly(path: StrPath) -> None:
    """Remove ``path``; a file already gone (or any error) is ignored."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_new(path: StrPath, data: bytes, sync: bool = True) -> None:
    """Create ``path`` (it must not exist), write all of ``data``, and with ``sync`` fsync it.

    On any failure nothing is left behind and the error is raised.

    :raises FileNotFoundError: the folder does not exist (nothing was created).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        n = os.write(fd, data)
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                view = view[os.write(fd, view):]
        if sync:
            fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def atomic_write(path: StrPath, data: bytes, tmp: StrPath) -> None:
    """Replace ``path`` by ``data`` durably: write ``tmp``, fsync, rename, fsync the folder.

    ``tmp`` must be in the same folder as ``path``, under a name readers ignore.
    """
    write_new(tmp, data)
    try:
        rename(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")
