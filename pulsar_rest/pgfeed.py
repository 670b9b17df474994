"""The events of every instance sharing a PostgreSQL history, delivered to this one's bus in
their order.

A listener connection of its own (autocommit, outside the store's) waits for the channel's
notifications; each one, each commit of this instance's own events and a tick every second
make the feed read the events after the last one it delivered. The notifications only wake:
the events table is the truth. So a notification lost with a dropped connection costs at
most a tick, never an event: after a reconnection the feed LISTENs first, then reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg

from pulsar_rest.events import Event, EventBus, EventKind
from pulsar_rest.pgstore import CHANNEL, PgStore, shown_dsn

log = logging.getLogger(__name__)

# The longest an event of another instance waits, should its notification be lost.
TICK = 1.0
# Waits between attempts to reconnect the listener, the longest last.
RECONNECT = (0.1, 0.5, 1.0, 2.0)


class PgFeed:
    def __init__(
        self,
        dsn: str,
        store: PgStore,
        bus: EventBus,
        apply: Callable[[list[Event]], Awaitable[None]],
        kill: Callable[[list[tuple[int, str | None]]], None],
    ) -> None:
        """`apply` brings the service's tasks up to events and publishes them; `kill` is told
        of kills asked for through other instances."""
        self._dsn = dsn
        self._store = store
        self._bus = bus
        self._apply = apply
        self._kill = kill
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = False  # for /health: notifications arrive (else the tick carries on)
        store.on_events = self._wake.set

    def publish(self, kind: EventKind, task_id: int, status: str | None) -> None:
        """Number and keep a creation or change; every instance delivers it (this one too)."""
        self._store.add_event(kind, task_id, status)

    def request_kill(self, task_id: int, by: str | None) -> None:
        """Ask the instance that runs a task to stop it."""
        self._store.request_kill(task_id, by)

    async def first_queued(self, app: str, env: str) -> int | None:
        """The oldest task queued for `app` and `env` by any instance: the next to go."""
        return await self._store.first_queued(app, env)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._deliver())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _deliver(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()
            try:
                while events := await self._store.events_after(self._bus.seq):
                    await self._apply(events)
                if requests := await self._store.kill_requests():
                    self._kill(requests)
            except (psycopg.Error, OSError) as exc:
                log.warning("cannot read the events: %s (again in %s s)", exc, TICK)
            except Exception:
                # Whatever it was, the feed goes on: a stopped feed would stop every follower.
                log.exception("the events could not be delivered (again in %s s)", TICK)

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, connect_timeout=10)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.info("listening to %s again", shown_dsn(self._dsn))
                    failures = 0
                    self.listening = True
                    self._wake.set()  # what was missed while not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                self.listening = False
                pause = RECONNECT[min(failures, len(RECONNECT) - 1)]
                failures += 1
                shown = shown_dsn(self._dsn)
                log.warning("the event listener lost %s: %s (again in %s s)", shown, exc, pause)
                await asyncio.sleep(pause)  # a back-off, not a synchronisation
