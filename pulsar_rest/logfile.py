"""The server's own log: stdout or `--log-dir/pulsar-rest.log`, as text or one JSON object a
line (`--log-format json`) for log collectors; the file is reopened on SIGHUP, so logrotate
can move it away (its `postrotate` sends the signal)."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import queue
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_NAME = "pulsar-rest.log"
# Log lines about a task say so first ("task 12 running, pid 4242"): its id for JSON.
_TASK = re.compile(r"\btask (\d+)\b")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        task = _TASK.search(message)
        if task:
            entry["taskId"] = int(task.group(1))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


# What goes to the writing thread: a line, or the lines of one turn of the event loop, made.
_Lines = str | list[str]


class _Queued(logging.Handler):
    """Makes each line where it is logged, and hands it to the writing thread, which only
    writes: whatever Python runs in a thread holds the GIL, which the event loop then waits
    for (a line made there cost the loop as much, and the hand-overs on top).

    The lines of one turn of the event loop go together, at its end: one wake-up of the
    thread a turn, not one a line. Each wake-up hands the GIL to the thread and back, and a
    short task's three lines cost the loop about 18 futex calls that way. A warning or an
    error goes at once (after the lines before it): if the loop hangs next, it says why. A
    line from another thread goes at once too, so it may come before the loop's lines of
    the same moment."""

    def __init__(self, lines: queue.SimpleQueue[_Lines | None], formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.queue = lines
        self._turn: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop whose turn they are

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another thread, or before the loop: at once
            self.queue.put_nowait(line)
            return
        if self._turn and self._loop is not loop:
            self.flush()  # a loop that stopped before its turn ended, and will not end it
        if record.levelno >= logging.WARNING:
            self.flush()
            self.queue.put_nowait(line)
            return
        if not self._turn:
            self._loop = loop
            loop.call_soon(self.flush)
        self._turn.append(line)

    def flush(self) -> None:
        """Hand over the lines of this turn (also called by stop())."""
        lines, self._turn = self._turn, []
        if lines:
            self.queue.put_nowait(lines)


class _Listener(logging.handlers.QueueListener):
    """Writes all the lines queued when it wakes up in one write of the stream (and one
    flush): each write lets go of the GIL and takes it back, and the event loop, when it
    wants the GIL meanwhile, waits on a futex. Under load, lines pile up while it writes."""

    def __init__(self, lines: queue.SimpleQueue[_Lines | None], handler: logging.StreamHandler[Any]) -> None:
        super().__init__(lines, handler)
        self._lines = lines
        self._handler = handler
        self._stopping = False  # the sentinel came among the lines taken at once

    def dequeue(self, block: bool) -> list[str] | None:  # type: ignore[override]
        if self._stopping:
            return None  # the sentinel: the lines before it were written
        taken = self._lines.get(block)
        if taken is None:
            return None
        lines = taken if isinstance(taken, list) else [taken]
        while True:
            try:
                more = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if more is None:
                self._stopping = True
                return lines
            lines.extend(more if isinstance(more, list) else (more,))

    def handle(self, record: list[str]) -> None:  # type: ignore[override]
        handler = self._handler
        text = handler.terminator.join(record) + handler.terminator
        handler.acquire()  # not while SIGHUP's reopen swaps the stream
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:
            print(f"pulsar-rest: cannot write its log: {sys.exc_info()[1]}", file=sys.stderr)
        finally:
            handler.release()


_listener: _Listener | None = None


class LogFileError(RuntimeError):
    pass


def configure(log_dir: Path | None, log_format: str, debug: bool) -> logging.Handler:
    """Send every log line to stdout or the log file, from a thread of its own: a reader of
    stdout that lags (a full pipe) or a slow disk delays the log, never the event loop. Return
    the handler that writes; stop() writes what is left."""
    global _listener
    # A line says neither where in the code nor which thread or process wrote it: a record
    # costs no walk of the stack and no getpid() (the knobs of the logging HOWTO's
    # "Optimization"; the formats below use none of them).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler: logging.StreamHandler[Any]
    if log_dir is None:
        handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_dir / LOG_NAME, encoding="utf-8")
        except OSError as exc:
            raise LogFileError(f"--log-dir {log_dir}: {exc.strerror or exc}") from None
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    lines: queue.SimpleQueue[_Lines | None] = queue.SimpleQueue()  # None: stop
    stop()
    _listener = _Listener(lines, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Queued(lines, formatter)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def stop() -> None:
    """Write the lines still queued, and stop the writing thread."""
    global _listener
    if _listener is not None:
        for queued in logging.getLogger().handlers:
            if isinstance(queued, _Queued):
                queued.flush()  # the lines of a turn the loop did not end
        _listener.stop()
        _listener = None


def reopen(handler: logging.Handler) -> None:
    """After logrotate moved the file away: write to a new file of the same name."""
    if isinstance(handler, logging.FileHandler):
        try:
            stream = open(handler.baseFilename, "a", encoding="utf-8")  # noqa: SIM115 (the handler owns it)
        except OSError as exc:
            logging.getLogger(__name__).error("cannot reopen %s: %s", handler.baseFilename, exc.strerror)
            return
        old = handler.setStream(stream)
        if old is not None:
            old.close()
        logging.getLogger(__name__).info("log file reopened")
