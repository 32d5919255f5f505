"""Atomic, locked, durable writes: nothing a user saved is lost or half-overwritten.

Every write of a destination `DST` holds an exclusive lock (`fcntl.flock` on `.DST.lock` next to it), stages
the new content in `.DST.tmp-<pid>-*`, fsyncs it and moves it into place with a rename. Replacing an existing
folder retires it to `.DST.old-<time>-<pid>` first; the next writer of `DST` restores that copy if the swap was
cut between its two renames, or removes it if the swap completed. Staging left by a process that died is
removed by the next writer (under the lock, and only when its pid is not alive).
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class DestinationBusyError(FileExistsError):
    """Another process holds the lock of the destination (it is writing it right now)."""


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing `dst` unless `overwrite` (a clear FileExistsError before any work is done)."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder; remove it first.")


# ---- locking -------------------------------------------------------------------------------------------------
_held_locks: dict[str, list] = {}  # lock path -> [descriptor, nesting depth] of the locks this process holds


def lock_path(dst) -> Path:
    """The lock file of `dst`: `.DST.lock` in the same folder."""
    dst = Path(dst).resolve()
    return dst.parent / f".{dst.name}.lock"


@contextlib.contextmanager
def exclusive_lock(dst):
    """Hold the exclusive lock of `dst` for the block; raise DestinationBusyError (naming the holder) if taken.

    Re-entrant within a process. The lock file records `pid host` of its holder and is removed on release.
    """
    path = lock_path(dst)
    key = str(path)
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 200, 0).decode(errors="replace").split()
                os.close(descriptor)
                who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
                raise DestinationBusyError(
                    f"{Path(dst).resolve()} is being written by {who} (lock {path}); wait for it to finish or "
                    "choose another destination") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                    break  # else the previous holder removed the file while we waited for it: lock the new one
            os.close(descriptor)
    except PermissionError as error:
        raise PermissionError(f"cannot write into {path.parent} ({error.strerror}); choose a writable "
                              "destination") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held_locks[key] = [descriptor, 0]
    try:
        yield
    finally:
        del _held_locks[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


# ---- durability and recovery ---------------------------------------------------------------------------------
def fsync_path(path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, and `folder` itself."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(os.path.join(root, name))
        fsync_path(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover(dst: Path) -> None:
    """Finish what an interrupted writer of `dst` left; call with the lock of `dst` held.

    Restores `dst` from a retired `.DST.old-*` copy when `dst` is missing (a swap cut between its renames), else
    removes retired copies; removes `.DST.tmp-<pid>-*` staging whose process is dead.
    """
    name = re.escape(dst.name)
    retired, staged = [], []
    for entry in dst.parent.iterdir():
        if match := re.fullmatch(rf"\.{name}\.old-(\d+)-(\d+)", entry.name):
            retired.append((int(match.group(1)), entry))
        elif match := re.fullmatch(rf"\.{name}\.tmp-(\d+)-[a-z0-9_]{{8}}", entry.name):
            if not _pid_alive(int(match.group(1))):
                staged.append(entry)
    retired.sort(key=lambda item: item[0])
    if retired and not dst.exists():
        os.rename(retired.pop()[1], dst)  # the newest retired copy was the destination when the swap was cut
        fsync_path(dst.parent)
        logger.warning("%s: restored the previous copy (a replacement of it was interrupted)", dst)
    for _, entry in retired:
        _remove(entry)
    for entry in staged:
        _remove(entry)


def apply_default_permissions(path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes plain `mkdir`/`open` give under the
    user's umask: `mkdtemp`/`mkstemp` and safetensors' writer make files private (0600)."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


_apply_default_permissions = apply_default_permissions


# ---- writers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(dst, overwrite: bool = False):
    """Yield a staging folder next to `dst`; on success move it into place, replacing `dst` only if `overwrite`.

    The lock of `dst` is held throughout, and `dst` is checked again at the end: a folder that appeared meanwhile
    is never replaced without `overwrite`. An exception inside the block leaves `dst` untouched and removes the
    staging folder.
    """
    dst = Path(dst).resolve()
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dst):
        recover(dst)
        check_destination(dst, overwrite)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
        try:
            yield staging
            _apply_default_permissions(staging)
            fsync_tree(staging)
            appeared = f"{dst} appeared while it was written; pass --overwrite to replace it, or choose another " \
                "destination"
            if dst.exists() and not overwrite:
                raise FileExistsError(appeared)
            if dst.exists():
                retired = dst.parent / f".{dst.name}.old-{time.time_ns()}-{os.getpid()}"
                os.rename(dst, retired)
                try:
                    fsync_path(dst.parent)
                    os.rename(staging, dst)
                    fsync_path(dst.parent)
                except BaseException:
                    recover(dst)  # puts the retired copy back
                    raise
                _remove(retired)
            else:
                try:
                    os.rename(staging, dst)  # fails on a non-empty folder or a file created at this very moment
                except OSError as error:
                    raise FileExistsError(f"{appeared} ({error.strerror})") from None
                fsync_path(dst.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging)


@contextlib.contextmanager
def atomic_file(dst, overwrite: bool = False, mode: str = "wb", encoding: str | None = None):
    """Yield a stream to a staging file next to `dst`; on success fsync it and move it into place.

    `dst` is replaced only if `overwrite` (checked at the start and again, under the lock of `dst`, at the end).
    An exception inside the block leaves `dst` untouched and removes the staging file.
    """
    dst = Path(dst).resolve()
    if dst.is_dir():
        raise ValueError(f"{dst} is a folder; give a file name")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dst):
        recover(dst)
        descriptor, staging = tempfile.mkstemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent)
        try:
            with os.fdopen(descriptor, mode, encoding=encoding) as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o666 & ~umask)
            if dst.exists() and not overwrite:
                raise FileExistsError(f"{dst} appeared while it was written; pass --overwrite to replace it")
            os.replace(staging, dst)
            fsync_path(dst.parent)
        finally:
            if os.path.exists(staging):
                os.remove(staging)


def write_json_atomically(path, payload: dict, overwrite: bool = True) -> None:
    """Write `payload` as indented, key-sorted JSON to `path` through `atomic_file`."""
    with atomic_file(path, overwrite=overwrite, mode="w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2, sort_keys=True)
        stream.write("\n")
