"""Where tasks are kept. The service talks to the `TaskStore` interface only, so a
persistent store (SQLite, PostgreSQL) replaces the in-memory one without touching it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from pulsar_rest.output import LogWriter, OutputLog
from pulsar_rest.tasks import Task


class TaskStore(Protocol):
    def next_id(self) -> int:
        """A task id never handed out before."""

    def new_output(self, task_id: int) -> OutputLog:
        """The (empty) output log of a new task."""

    def add(self, task: Task) -> None: ...

    def save(self, task: Task) -> None:
        """Record a change of `task` (its status, pid, timings)."""

    def get(self, task_id: int) -> Task | None: ...

    def __iter__(self) -> Iterator[Task]:
        """Every task, oldest first."""

    def close(self) -> None:
        """Release what the store holds (after the last task has ended)."""


class MemoryStore:
    """Tasks in a dict, ids from a counter: lost on restart. Output logs go to `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self._tasks: dict[int, Task] = {}
        self._last_id = 0
        self._log_dir = log_dir
        self._writer = LogWriter()

    def new_output(self, task_id: int) -> OutputLog:
        return OutputLog(self._log_dir / f"{task_id}.log", self._writer)

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def add(self, task: Task) -> None:
        if task.id in self._tasks:
            raise ValueError(f"task {task.id} exists already")
        self._tasks[task.id] = task

    def save(self, task: Task) -> None:
        pass  # the dict holds the live object

    def get(self, task_id: int) -> Task | None:
        return self._tasks.get(task_id)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def close(self) -> None:
        self._writer.close()
