"""One agent per root: an exclusive ``fcntl`` lock with an inode re-check."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from prep_agent.core.errors import Error, LockError


class LockFile:
    """Holds an exclusive lock on a file for the life of the process."""

    def __init__(self, path: Path, blocking: bool = False, holder: str = "prep-agent") -> None:
        self.path = path
        self.blocking = blocking
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (waiting if ``blocking``), else raise ``LockError``."""
        flags = fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            try:
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise Error(f"cannot open lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.lockf(fd, flags)
            except OSError:
                os.close(fd)
                raise LockError(f"another {self.holder} is running on {self.path.parent}") from None
            # The file may have been removed and recreated between open and lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Release the lock (the file stays, so its inode stays stable)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
