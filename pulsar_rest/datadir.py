"""The data directory belongs to one server at a time.

An exclusive `flock` on a lock file in it is taken before anything in it is read or
changed. The kernel releases it when the process dies, so a `kill -9` never leaves it
stale. The holder writes its pid (and, once it listens, its addresses) in the file, so a
second server can say who holds it. A start that fails removes what it created.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

LOCK_NAME = "pulsar-rest.lock"


class DataDirError(RuntimeError):
    """The data directory cannot be used: the message is one line for the user."""


class DataDirLock:
    """This process's claim on a data directory, held until the process ends."""

    def __init__(self, path: Path, fd: int, before: set[str] | None) -> None:
        self.path = path
        self._fd = fd
        # Its entries before this start (None: the directory itself is new): what a failed
        # start created is what is not in it.
        self._before = before
        self.serving = False  # it has listened: from then on, what it made is history

    @classmethod
    def claim(cls, path: Path) -> DataDirLock:
        """Take the data directory, creating it if needed; DataDirError if another process
        holds it (with its pid and addresses) or it cannot be used."""
        try:
            before = set(os.listdir(path)) if path.exists() else None
            path.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC: a task's process (a daemon that outlives the server) never
            # inherits the lock.
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DataDirError(f"--data-dir {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise DataDirError(
                f"--data-dir {path} is in use by another pulsar-rest ({holder}): one data "
                "directory serves one server; stop that one or give this one its own --data-dir"
            ) from None
        lock = cls(path, fd, before)
        lock.announce([])
        return lock

    def announce(self, urls: list[str]) -> None:
        """Say in the lock file who holds it and where it listens (once it does)."""
        self.serving = self.serving or bool(urls)
        data = json.dumps({"pid": os.getpid(), "urls": urls}).encode()
        with contextlib.suppress(OSError):  # only informative: a full disk must not stop us
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data + b"\n", 0)

    def abandon(self) -> None:
        """The start failed: remove what it created in the data directory, then let go."""
        if self._before is None:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for name in set(os.listdir(self.path)) - self._before - {LOCK_NAME}:
                entry = self.path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        # The file stays: removing a lock file lets a second process lock a new file while
        # a third still waits on the old one.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, object]) -> str:
    pid = holder.get("pid")
    urls = holder.get("urls")
    who = f"pid {pid}" if isinstance(pid, int) else "pid unknown"
    if isinstance(urls, list) and urls:
        return f"{who}, listening on {', '.join(str(url) for url in urls)}"
    return f"{who}, starting"
