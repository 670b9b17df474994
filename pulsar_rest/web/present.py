"""Tasks as JSON: the documented task object, and a summary without output for lists,
streams and cursor answers. Serialised answers are cached per task version, so a thousand
long-polls woken by one line serialise the task once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pulsar_rest.output import TAIL_LIMIT
from pulsar_rest.tasks import Task, Version

# Answers kept; each is at most about TAIL_LIMIT bytes.
_CACHE_SIZE = 32


def iso(moment: datetime | None) -> str | None:
    """The moment in UTC to the millisecond, as JavaScript's toISOString() writes it."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # Formatted by hand: half the cost of isoformat(), three times in each task of a list.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
        moment.microsecond // 1000,
    )  # fmt: skip


def summary(task: Task) -> dict[str, Any]:
    """The task without its output (whose size says how much there is)."""
    return {
        "id": task.id,
        "status": task.status.value,
        "app": task.app,
        "env": task.env,
        "action": task.action,
        "exitCode": task.exit_code,
        "signal": task.signal,
        "killSignal": task.kill_signal,
        "pid": task.pid,
        "command": task.command,
        "createdAt": iso(task.created_at),
        "startedAt": iso(task.started_at),
        "finishedAt": iso(task.finished_at),
        "createdBy": task.created_by,
        "killedBy": task.killed_by,
        "confCommit": task.conf_commit,
        "taskVariables": list(task.variable_names),  # names only: values may be secrets
        "outputSize": task.output.size,
        "stdoutSize": None if task.stdout is None else task.stdout.size,  # None: not kept apart
    }


async def task_json(task: Task) -> dict[str, Any]:
    """The documented task object; `output` holds the last MiB at most (`outputOffset` is
    where it starts in the log, `outputTruncated` says whether it is the whole output)."""
    # The task as it is now, and its output up to the size it shows: the log grows in the
    # writer's thread, and the task may end while its tail is read from the file.
    shown = summary(task)
    offset, text = await task.output.tail(TAIL_LIMIT, shown["outputSize"])
    return {**shown, "output": text, "outputOffset": offset, "outputTruncated": offset > 0}


class AnswerCache:
    """JSON bodies of `{"changed": true, "task": ...}` and of the task itself, per version."""

    def __init__(self) -> None:
        self._bodies: dict[tuple[int, Version, bool], bytes] = {}

    async def body(self, task: Task, changed: bool) -> bytes:
        key = (task.id, task.version, changed)
        body = self._bodies.get(key)
        if body is None:
            data = await task_json(task)
            body = json.dumps({"changed": True, "task": data} if changed else data).encode()
            if key[1] != task.version:
                return body  # the task moved on while its tail was read: do not cache
            if len(self._bodies) >= _CACHE_SIZE:
                self._bodies.clear()
            self._bodies[key] = body
        return body
