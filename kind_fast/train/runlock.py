"""One training run per output folder: an exclusive lock on ``<out>/.kind_fast.lock``.

The lock is an OS file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) held for the
life of the run. The kernel drops it when the process ends in any way, SIGKILL included, so a
lock left by a dead run never blocks the next one; the file's text (PID, host, start time) only
makes the refusal message say who holds it. The lock file is never deleted (deleting a lock
file that others may have open would let two runs hold "the" lock at once).

Locks on network file systems depend on the server (NFSv4 and Lustre with ``flock`` enabled
honour them across hosts).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".kind_fast.lock"


class RunLockedError(FileExistsError):
    """The output folder is in use by another training run."""


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False


class RunLock:
    """``RunLock(out).acquire()`` or ``with RunLock(out): ...``; raises RunLockedError when
    another live process holds the folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by another training run ({holder}); wait for it to finish, "
                "or choose another --out (nothing was changed)")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a Trainer that is dropped without close() still frees the folder
        self.release()
