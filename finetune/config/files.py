"""Output files and folders are written whole or not at all, by one process at a time:

    write_atomic          a file goes to a temporary sibling, then is renamed into place
    remove_dead_staging   folders staged by a process that was killed (`<name>-<pid>`) are cleared by the next one
    hold_lock             an exclusive flock on a lock file; the kernel drops it when its process ends, however
                          it ends, so a killed run leaves no lock that blocks the next
"""

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def remove_dead_staging(parent: Path, pattern: str) -> None:
    """Delete the folders `parent/pattern` whose name ends in `-<pid>` of a process that no longer runs."""
    for stale in parent.glob(pattern):
        pid = stale.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is the pid it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by process {holder}")
        self.path, self.holder = path, holder


def _read_holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def lock_holder(path: Path) -> str | None:
    """The pid of the live process holding the lock at `path`, or None; creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probes never block each other
        return None
    except BlockingIOError:
        return _read_holder(fd)
    finally:
        os.close(fd)  # closing releases the probe's shared lock


@contextmanager
def hold_lock(path: Path):
    """Hold an exclusive lock on `path` (created, holding this pid) for the `with` block, then remove it.
    Raises LockHeld if a live process holds it; a lock file left by a dead process is simply taken over."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(path, holder) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        os.unlink(path)  # while still held: no one can lock the old file and believe they hold the new one
        os.close(fd)
