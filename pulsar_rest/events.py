"""In-process events: one increasing sequence, and waiters woken by topic.

A waiter registers before its first await, so a check of the state followed by `wait()`
cannot miss an event published in between. Waiters are removed in `finally`: a cancelled
waiter (a client that went away) leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class EventKind(enum.StrEnum):
    CREATED = "task.create"  # a task was recorded
    CHANGED = "task.change"  # a task's status changed
    OUTPUT = "task.output"  # a task's output grew


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: EventKind
    task_id: int


def created_topic() -> str:
    return "created"


def task_topic(task_id: int) -> str:
    """Every event of one task: its creation, output and status changes."""
    return f"task:{task_id}"


def state_topic(task_id: int) -> str:
    """Status changes of one task."""
    return f"state:{task_id}"


def _topics(event: Event) -> tuple[str, ...]:
    if event.kind is EventKind.CREATED:
        return created_topic(), task_topic(event.task_id)
    if event.kind is EventKind.CHANGED:
        return task_topic(event.task_id), state_topic(event.task_id)
    return (task_topic(event.task_id),)


class EventBus:
    """Publishes numbered events and wakes whoever waits on their topics."""

    def __init__(self) -> None:
        self._seq = 0
        self._waiters: dict[str, set[asyncio.Future[Event | None]]] = {}
        self._closed = False

    @property
    def seq(self) -> int:
        """The number of the last event published (0 before any)."""
        return self._seq

    @property
    def waiter_count(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def publish(self, kind: EventKind, task_id: int) -> Event:
        self._seq += 1
        event = Event(self._seq, kind, task_id)
        for topic in _topics(event):
            for fut in self._waiters.pop(topic, ()):
                if not fut.done():
                    fut.set_result(event)
        return event

    async def wait(self, topic: str, timeout: float) -> Event | None:
        """The next event on `topic`, or None when `timeout` passes or the bus closes."""
        if self._closed or timeout <= 0:
            return None
        fut: asyncio.Future[Event | None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(topic, set())
        waiters.add(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters.discard(fut)
            if not waiters and self._waiters.get(topic) is waiters:
                del self._waiters[topic]

    def close(self) -> None:
        """Answer every waiter now (with None) and refuse new waits: the server is stopping."""
        self._closed = True
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
