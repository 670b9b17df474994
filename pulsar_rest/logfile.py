"""The server's own log: stdout or `--log-dir/pulsar-rest.log`, as text or one JSON object a
line (`--log-format json`) for log collectors; the file is reopened on SIGHUP, so logrotate
can move it away (its `postrotate` sends the signal)."""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import queue
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

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


class _Queued(logging.handlers.QueueHandler):
    """Hands each line to the writing thread: the message is made now (its arguments may
    change later), the line is formatted and written there, the exception's text apart."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = _PLAIN.formatException(record.exc_info)
            record.exc_info = None
        return record


_PLAIN = logging.Formatter()
_listener: logging.handlers.QueueListener | None = None


class LogFileError(RuntimeError):
    pass


def configure(log_dir: Path | None, log_format: str, debug: bool) -> logging.Handler:
    """Send every log line to stdout or the log file, from a thread of its own: a reader of
    stdout that lags (a full pipe) or a slow disk delays the log, never the event loop. Return
    the handler that writes; stop() writes what is left."""
    global _listener
    handler: logging.Handler
    if log_dir is None:
        handler = logging.StreamHandler(sys.stdout)
    else:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_dir / LOG_NAME, encoding="utf-8")
        except OSError as exc:
            raise LogFileError(f"--log-dir {log_dir}: {exc.strerror or exc}") from None
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stop()
    _listener = logging.handlers.QueueListener(lines, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Queued(lines)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def stop() -> None:
    """Write the lines still queued, and stop the writing thread."""
    global _listener
    if _listener is not None:
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
