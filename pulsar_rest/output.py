"""A task's output: decoded as UTF-8 as it arrives, appended to a log file, and kept in
memory only as a bounded tail.

The log holds UTF-8 text (bytes that were not UTF-8 became U+FFFD), so byte offsets into it
are stable cursors: the file only grows, and what was written is never rewritten.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pulsar_rest.turns import Then, TurnBatch, run_then, settle

log = logging.getLogger(__name__)

# What a running task keeps in memory, and what a task shows as `output` in its JSON. An
# ended task keeps nothing: its output is read back from its file (from the page cache,
# mostly), so thousands of tasks in the history hold no output in memory.
TAIL_LIMIT = 1024 * 1024
# ... unless its whole output is this short: then it stays in memory as long as its task
# does (the service keeps the 500 it saw last: 4 MiB, twice that for tasks that keep their
# stdout apart). The answer to the client that waited for the end, and the looks that follow
# it, read no file: a read in a thread handed the GIL over and back some 30 times, a tenth
# of a short task's cost.
ENDED_KEEP = 8 * 1024


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


_Outcome = tuple[object, BaseException | None]  # a job's result, or its error


class LogWriter:
    """One thread that appends to every log, in order: a slow disk delays the logs, never
    the event loop (a write can block for long under the kernel's writeback throttling).
    What is asked for while the thread works on a batch goes to it together, as its next
    one: a burst costs one wake-up of the thread and one of the loop, not one each per log."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pulsar-rest-log")
        self._jobs: TurnBatch[tuple[Callable[[], object], Then[object]]] = TurnBatch(
            self._run, one_at_a_time=True
        )

    def submit(self, fn: Callable[..., object], *args: object) -> asyncio.Future[object]:
        """Run `fn(*args)` in the thread after what was asked before; its result."""
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.post(functools.partial(settle, done), fn, *args)
        return done

    def post(self, then: Then[object], fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` in the thread after what was asked before, then
        `then(result, error)` on the event loop."""
        self._jobs.add((functools.partial(fn, *args), then))

    def _run(self, batch: list[tuple[Callable[[], object], Then[object]]]) -> None:
        def tell(outcomes: list[_Outcome] | None, error: BaseException | None) -> None:
            try:
                assert outcomes is not None, error  # _run_all keeps each job's error
                for (_, then), outcome in zip(batch, outcomes, strict=True):
                    try:
                        then(*outcome)
                    except Exception:  # the others of the batch (other tasks' logs) are told still
                        log.exception("a log's write was done, and what followed it failed")
            finally:
                self._jobs.done()

        run_then(self._pool, functools.partial(_run_all, [job for job, _ in batch]), tell)

    def close(self) -> None:
        self._jobs.flush(now=True)
        self._pool.shutdown(wait=True)


def _run_all(jobs: list[Callable[[], object]]) -> list[_Outcome]:
    """Each job's result or error, in order (one failing leaves the others)."""
    outcomes: list[_Outcome] = []
    for job in jobs:
        try:
            outcomes.append((job(), None))
        except Exception as exc:
            outcomes.append((None, exc))
    return outcomes


def _told_nothing(_: object, error: BaseException | None) -> None:
    pass  # (_remove keeps its errors: a file that was not there is the usual case)


def _remove(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class OutputLog:
    def __init__(
        self,
        path: Path | str,
        writer: LogWriter | None,
        tail_limit: int = TAIL_LIMIT,
        size: int | None = None,
    ) -> None:
        """A new, empty log, written by `writer`; without a writer, the existing log of an
        ended task, for reading (of `size` bytes if known, else as big as its file). The file
        is made by the first write: a task that waits in a queue holds no file descriptor,
        and one that never wrote has no file."""
        # A Path is made when first asked for: a page of a thousand tasks of the history makes
        # a thousand logs, and most are never read.
        self._path = path
        self._fd: int | None = None  # opened and closed by the writer's thread only
        self._writer = writer
        if writer is not None:
            # Whatever a file of that name held is not this task's (a history moved away
            # without its logs), even if this task never writes: gone before the first write.
            writer.post(_told_nothing, _remove, path)
        # One decoder per stream (stdout, stderr) merged here: a character one of them cut
        # between two reads stays whole, whatever the other wrote in between.
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        self._tail = bytearray()
        self._tail_limit = tail_limit
        self._closed = writer is None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._unacked = 0  # writes handed to the writer, not yet told done
        # Bytes in the file: all that readers see. A byte is shown to nobody before it is in
        # the file, so whatever a client was shown survives a crash of the server. The
        # writer's thread counts them as it writes them (the only one that changes it while
        # the log is written): a follower's answer has them then, not a turn of the loop
        # later, and under load a turn is long.
        if writer is not None:
            self.size = 0
        elif size is not None:
            self.size = size
        else:
            self.size = self.path.stat().st_size if self.path.exists() else 0
        self._taken = self.size  # bytes taken in (by the event loop): the file's, and the backlog
        self.error: OSError | None = None  # the first write error, if the disk failed us
        # Called (on the event loop) with the count of bytes that reached the file.
        self.on_written: Callable[[int], None] | None = None

    @property
    def path(self) -> Path:
        if not isinstance(self._path, Path):
            self._path = Path(self._path)
        return self._path

    @property
    def closed(self) -> bool:
        """True once the log takes no more output."""
        return self._closed

    def feed(self, data: bytes, stream: int = 0) -> int:
        """Append raw process output of `stream`; return how many bytes the log grew by."""
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if not decoder.getstate()[0]:
            # Fast paths (no character pending from the last chunk): ASCII, or valid UTF-8
            # up to a character cut by the read, goes to the log as it is.
            if data.isascii():
                return self._append(data)
            whole = complete_chars(data)
            try:
                whole.decode()
            except UnicodeDecodeError:
                pass
            else:
                return self._append(whole) + self._append(decoder.decode(data[len(whole) :]).encode())
        return self._append(decoder.decode(data).encode())

    async def close(self) -> int:
        """Flush a trailing incomplete character (as U+FFFD), wait until everything is in
        the file, and let the file go; return how many bytes the flush added."""
        if self._closed:
            return 0
        added = sum(self._append(d.decode(b"", final=True).encode()) for d in self._decoders.values())
        self._closed = True
        assert self._writer is not None
        # The descriptor's close goes to the thread now, after the writes (in order), and
        # even if this wait is cancelled; all of it is in the file once every write is told
        # done, which is all the task's end waits for (not a wake-up of the thread more).
        self._writer.post(self._file_closed, self._close_file)
        await self._wait_written(lambda: not self._unacked)
        if len(self._tail) > ENDED_KEEP or self.error is not None:
            # All of it is in the file now; or the file lacks some of it, and memory would
            # show what the file cannot once the task is forgotten here.
            self._tail = bytearray()
        return added

    async def drain(self, below: int = 0) -> None:
        """Wait until fewer than `below` bytes (none by default) wait for the file."""
        await self._wait_written(lambda: self.backlog <= below)

    async def _wait_written(self, done: Callable[[], bool]) -> None:
        """Wait until `done()`, looked at after each write is told done."""
        while not done():
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _append(self, data: bytes) -> int:
        if not data:
            return 0
        if self._closed or self._writer is None:
            raise ValueError(f"{self.path} is closed")
        self._taken += len(data)
        self._tail += data
        # Trim in large steps (the copy is paid once per tail_limit bytes), never dropping
        # what the file does not hold yet: older offsets are read from the file.
        keep = max(self._tail_limit, self.backlog)
        if len(self._tail) > 2 * keep:
            del self._tail[: len(self._tail) - keep]
        self._unacked += 1
        self._writer.post(functools.partial(self._written, len(data)), self._write_file, data)
        return len(data)

    def _write_file(self, data: bytes) -> None:
        """In the writer's thread."""
        try:
            if self._fd is None:  # the first write makes the file (an older one went in __init__)
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            _write_all(self._fd, data)
        finally:
            # Counted as in the file even if the write failed: offsets stay consistent with
            # what memory holds, and the failure is logged once (in _written).
            self.size += len(data)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _file_closed(self, _: object, error: BaseException | None) -> None:
        if error is not None:
            log.error("cannot close %s: %s", self.path, error)

    def _written(self, count: int, _: object, error: BaseException | None) -> None:
        self._unacked -= 1
        if error is not None and self.error is None:
            self.error = error if isinstance(error, OSError) else OSError(str(error))
            log.error("cannot write %s: %s", self.path, self.error)
        try:
            if self.on_written is not None:
                self.on_written(count)
        finally:  # a close or a drain waits for this write whatever its listener did
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    @property
    def taken(self) -> int:
        """Bytes taken in: in the file, or on their way to it."""
        # A log that is not written here grows by its size alone (another instance's task).
        return self._taken if self._writer is not None else self.size

    @property
    def backlog(self) -> int:
        """Bytes taken in, not yet in the file (the two read one after the other: the
        writer's thread may count a write in between)."""
        return self.taken - self.size

    @property
    def tail_start(self) -> int:
        """Offset of the first byte still in memory (memory also holds the backlog)."""
        return self.taken - len(self._tail)

    async def tail(self, limit: int = TAIL_LIMIT, end: int | None = None) -> tuple[int, str]:
        """The offset and text of (about) the last `limit` bytes before `end` (by default,
        all there is now), whole characters only."""
        end = self.size if end is None else end
        start = max(0, end - limit)
        data = await self.read(start, end - start)
        skip = _char_start(data)
        return start + skip, data[skip:].decode(errors="replace")

    def tail_lines(self, count: int, window: int = 64 * 1024) -> list[str]:
        """The last `count` lines within the last `window` bytes in memory (while it runs)."""
        data = self._tail[-window:]
        return data[_char_start(data) :].decode(errors="replace").splitlines()[-count:]

    def has_newline_after(self, offset: int) -> bool:
        """Whether a whole line ends after `offset` (older output than memory holds counts
        as having one: it is more than a tail's worth)."""
        if offset < self.tail_start:
            return True
        return self._tail.find(b"\n", offset - self.tail_start, self.size - self.tail_start) != -1

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
        try:
            with self.path.open("rb") as log:
                log.seek(offset)
                return log.read(end - offset)
        except FileNotFoundError:
            return b""  # pruned from the history while it was being read


class ChunkLog(OutputLog):
    """The log of a task as a database shared by several instances keeps it: read through
    `reader(offset, end)`, of `size` bytes so far (it grows while another instance runs the
    task). Its file is this instance's copy, if it ran the task."""

    def __init__(self, path: Path, size: int, reader: Callable[[int, int], Awaitable[bytes]]) -> None:
        super().__init__(path, None, size=size)
        self._reader = reader

    async def read(self, offset: int, limit: int) -> bytes:
        end = min(self.size, offset + limit)
        if offset >= end:
            return b""
        return await self._reader(offset, end)
