"""A task's output: decoded as UTF-8 as it arrives, appended to a log file, and kept in
memory only as a bounded tail.

The log holds UTF-8 text (bytes that were not UTF-8 became U+FFFD), so byte offsets into it
are stable cursors: the file only grows, and what was written is never rewritten.
"""

from __future__ import annotations

import asyncio
import codecs
import os
from pathlib import Path

# What a running task keeps in memory, and what a task shows as `output` in its JSON.
TAIL_LIMIT = 1024 * 1024
# What an ended task keeps in memory: enough for most outputs and pulsar's verdict lines;
# more is read back from its file. Thousands of ended tasks then hold little memory.
ENDED_TAIL = 64 * 1024


def _char_start(data: bytes | bytearray, limit: int = 4) -> int:
    """How many bytes to skip so `data` starts on a character (not a continuation byte)."""
    skip = 0
    while skip < min(limit, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return skip


def _char_len(lead: int) -> int:
    """Length of the UTF-8 character that starts with byte `lead`."""
    if lead < 0x80:
        return 1
    if lead < 0xE0:
        return 2
    return 3 if lead < 0xF0 else 4


def complete_chars(data: bytes) -> bytes:
    """The longest prefix of UTF-8 `data` that ends with a whole character."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        lead = data[end - back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            return data if back >= _char_len(lead) else data[: end - back]
    return data


class OutputLog:
    def __init__(self, path: Path, tail_limit: int = TAIL_LIMIT) -> None:
        self.path = path
        # A new task's log starts empty, whatever a file of that name held before.
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640
        )
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = bytearray()
        self._tail_limit = tail_limit
        self.size = 0  # bytes in the log

    @property
    def closed(self) -> bool:
        return self._fd is None

    def feed(self, data: bytes) -> int:
        """Append raw process output; return how many bytes the log grew by (may be 0)."""
        if data.isascii() and not self._decoder.getstate()[0]:
            return self._append(data)  # the common case needs no decoding round trip
        return self._append(self._decoder.decode(data).encode())

    def close(self) -> int:
        """Flush a trailing incomplete character (as U+FFFD) and close the file."""
        added = self._append(self._decoder.decode(b"", final=True).encode())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        del self._tail[: max(0, len(self._tail) - ENDED_TAIL)]
        return added

    def _append(self, data: bytes) -> int:
        if not data:
            return 0
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        self._tail += data
        if len(self._tail) > 2 * self._tail_limit:
            # Trim in large steps, so the copy is paid once per tail_limit bytes.
            del self._tail[: len(self._tail) - self._tail_limit]
        return len(data)

    @property
    def tail_start(self) -> int:
        """Offset of the first byte still in memory."""
        return self.size - len(self._tail)

    async def tail(self, limit: int = TAIL_LIMIT) -> tuple[int, str]:
        """The offset and text of (about) the last `limit` bytes, whole characters only."""
        start = max(0, self.size - limit)
        data = await self.read(start, limit)
        skip = _char_start(data)
        return start + skip, data[skip:].decode(errors="replace")

    def tail_lines(self, count: int) -> list[str]:
        """The last `count` lines of what is in memory (at least the last 64 KiB)."""
        data = self._tail[-ENDED_TAIL:]
        return data[_char_start(data) :].decode(errors="replace").splitlines()[-count:]

    def has_newline_after(self, offset: int) -> bool:
        """Whether a whole line ends after `offset` (older output than memory holds counts
        as having one: it is more than a tail's worth)."""
        if offset < self.tail_start:
            return True
        return self._tail.find(b"\n", offset - self.tail_start) != -1

    async def read(self, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes from `offset`: from memory when it still holds them, else
        from the file in a thread, so a read of old output never blocks the event loop."""
        end = min(self.size, offset + limit)
        if offset >= end:
            return b""
        if offset >= self.tail_start:
            return bytes(self._tail[offset - self.tail_start : end - self.tail_start])
        return await asyncio.get_running_loop().run_in_executor(None, self._read_file, offset, end)

    def _read_file(self, offset: int, end: int) -> bytes:
        with self.path.open("rb") as log:
            log.seek(offset)
            return log.read(end - offset)
