"""In-process events: one increasing sequence, and waiters woken by topic.

A waiter registers before its first await, so a check of the state followed by `wait()`
cannot miss an event published in between. Waiters are removed in `finally`: a cancelled
waiter (a client that went away) leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# How many create/change events are kept for cursors (`since`, Last-Event-ID). Output
# events are neither numbered nor kept: output is replayed from the log by byte offset.
KEEP_EVENTS = 10_000


class EventKind(enum.StrEnum):
    CREATED = "task.create"  # a task was recorded
    CHANGED = "task.change"  # a task's status changed
    OUTPUT = "task.output"  # a task's output grew


@dataclass(frozen=True, slots=True)
class Event:
    # The cursor: creations and status changes each take the next number; output events
    # carry the current one (output is addressed by byte offset).
    seq: int
    kind: EventKind
    task_id: int
    status: str | None = None  # the task's status when the event happened


def created_topic() -> str:
    return "created"


def task_topic(task_id: int) -> str:
    """Every event of one task: its creation, output and status changes."""
    return f"task:{task_id}"


def state_topic(task_id: int) -> str:
    """Status changes of one task."""
    return f"state:{task_id}"


def changes_topic() -> str:
    """Every creation and status change of every task."""
    return "changes"


def all_topic() -> str:
    """Everything, output included."""
    return "all"


def _topics(event: Event) -> tuple[str, ...]:
    if event.kind is EventKind.CREATED:
        return created_topic(), task_topic(event.task_id), changes_topic(), all_topic()
    if event.kind is EventKind.CHANGED:
        return task_topic(event.task_id), state_topic(event.task_id), changes_topic(), all_topic()
    return task_topic(event.task_id), all_topic()


class CursorGone(LookupError):
    """A cursor the server cannot answer: from the future, or older than what it keeps.
    The client lists again and follows from the current cursor."""


class EventBus:
    """Publishes numbered events and wakes whoever waits on their topics."""

    def __init__(
        self,
        last_seq: int = 0,
        keep: int | None = None,
        recent: Sequence[Event] = (),
        horizon: int | None = None,
    ) -> None:
        """`recent`: the events up to `last_seq` already numbered (by a shared store), which
        answer cursors from `horizon` on."""
        self._seq = last_seq
        self._published = 0
        # Cursors at or after this one can be answered from `_recent`.
        self._horizon = last_seq if horizon is None else horizon
        self._recent: deque[Event] = deque(recent, maxlen=KEEP_EVENTS if keep is None else keep)
        self._waiters: dict[str, set[asyncio.Future[Event | None]]] = {}
        self._closed = False

    @property
    def seq(self) -> int:
        """The number of the last event published (0 before any)."""
        return self._seq

    @property
    def published(self) -> int:
        """How many events were published, of every kind: a change of it is news."""
        return self._published

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiter_count(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def publish(self, kind: EventKind, task_id: int, status: str | None = None) -> Event:
        seq = self._seq if kind is EventKind.OUTPUT else self._seq + 1
        event = Event(seq, kind, task_id, status)
        self._publish(event)
        return event

    def _publish(self, event: Event) -> None:
        self._published += 1
        if event.kind is not EventKind.OUTPUT:
            self._seq = event.seq
            if len(self._recent) == self._recent.maxlen:
                self._horizon = self._recent[0].seq
            self._recent.append(event)
        for topic in _topics(event):
            for fut in self._waiters.pop(topic, ()):
                if not fut.done():
                    fut.set_result(event)

    def deliver(self, event: Event) -> None:
        """Publish an event numbered elsewhere (a shared store's), the next after `seq`."""
        if event.kind is not EventKind.OUTPUT and event.seq <= self._seq:
            return  # had already
        self._publish(event)

    def since(self, seq: int) -> list[Event]:
        """The create and change events after `seq`, oldest first."""
        if seq > self._seq:
            raise CursorGone(f"cursor {seq} is ahead of the server's {self._seq}: list again")
        if seq < self._horizon:
            raise CursorGone(f"cursor {seq} is older than the events kept (from {self._horizon}): list again")
        found: list[Event] = []
        for event in reversed(self._recent):
            if event.seq <= seq:
                break
            found.append(event)
        found.reverse()
        return found

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

    async def wait_for(self, topic: str, done: Callable[[], bool], timeout: float) -> bool:
        """Wait on `topic` until `done()` holds, `timeout` passes or the bus closes; whether
        it holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            remaining = deadline - asyncio.get_running_loop().time()
            if await self.wait(topic, remaining) is None:
                return done()
        return True

    def close(self) -> None:
        """Answer every waiter now (with None) and refuse new waits: the server is stopping."""
        self._closed = True
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
