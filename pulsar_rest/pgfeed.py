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
import socket
from collections.abc import Awaitable, Callable

import psycopg

from pulsar_rest import runner
from pulsar_rest.events import Event, EventBus, EventKind
from pulsar_rest.pgstore import CHANNEL, CHUNK, PgStore, shown_dsn
from pulsar_rest.tasks import Task

log = logging.getLogger(__name__)

# The longest an event of another instance waits, should its notification be lost.
TICK = 1.0
# Events read from the store at once.
EVENTS_READ = 1000
# Waits between attempts to reconnect the listener, the longest last.
RECONNECT = (0.1, 0.5, 1.0, 2.0)
# How long output waits before it is shipped to the database, with what follows it: a few
# transactions a second for a task however fast it writes.
SHIP_EVERY = 0.1


class PgFeed:
    def __init__(
        self,
        store: PgStore,
        bus: EventBus,
        apply: Callable[[list[Event]], Awaitable[None]],
        kill: Callable[[list[tuple[int, str | None]]], None],
        grew: Callable[[int, int, int], None],
        remote: Callable[[], list[int]],
    ) -> None:
        """`apply` brings the service's tasks up to events and publishes them; `kill` is told
        of kills asked for through other instances; `grew` of the output of another
        instance's task (its id, stream and size); `remote` says which tasks those are."""
        self._store = store
        self._bus = bus
        self._apply = apply
        self._kill = kill
        self._grew = grew
        self._remote = remote
        # Output shipping of each task this instance runs: a timer, or the shipping under way;
        # and how much of each of its streams is shipped.
        self._shipping: dict[int, asyncio.TimerHandle | asyncio.Task[None]] = {}
        self._shipped: dict[tuple[int, int], int] = {}
        self._kills_told = False  # a "k" notification came since kills were last looked for
        self._checked = 0.0  # when the lease, the dead instances and the sizes were last seen to
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

    def output_written(self, task: Task) -> None:
        """A task this instance runs wrote output: it is shipped soon, with what follows."""
        if task.id not in self._shipping:
            self._shipping[task.id] = asyncio.get_running_loop().call_later(SHIP_EVERY, self._ship_now, task)

    def _ship_now(self, task: Task) -> None:
        shipping = asyncio.get_running_loop().create_task(self._ship(task))
        self._shipping[task.id] = shipping

        def shipped(_: asyncio.Task[None]) -> None:
            if self._shipping.get(task.id) is shipping:
                del self._shipping[task.id]
                if self._shipped.get((task.id, 0), 0) < task.output.size:  # written meanwhile
                    self.output_written(task)

        shipping.add_done_callback(shipped)

    async def output_done(self, task: Task) -> None:
        """The task's logs are complete: all of them shipped, before its end is written."""
        pending = self._shipping.pop(task.id, None)
        if isinstance(pending, asyncio.TimerHandle):
            pending.cancel()
        elif pending is not None:
            with contextlib.suppress(Exception):
                await pending
        await self._ship(task)
        self._shipped.pop((task.id, 0), None)
        self._shipped.pop((task.id, 1), None)

    async def _ship(self, task: Task) -> None:
        for stream, log in ((0, task.output), (1, task.stdout)):
            if log is None:
                continue
            start = done = self._shipped.get((task.id, stream), 0)
            chunks: list[bytes] = []
            while done < log.size:
                data = await log.read(done, min(CHUNK, log.size - done))
                if not data:
                    break  # its file is gone (it cannot be: its task still runs)
                chunks.append(data)
                done += len(data)
            if chunks:
                self._store.add_chunks(task.id, stream, start, chunks)
                self._shipped[(task.id, stream)] = done

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
                while True:
                    events = await self._store.events_after(self._bus.seq, EVENTS_READ)
                    if events:
                        await self._apply(events)
                    if len(events) < EVENTS_READ:  # all there were
                        break
                tick = (now := asyncio.get_running_loop().time()) >= self._checked + TICK
                # Kills asked of this instance: when told of one ("k"), else once a tick (a
                # notification may be lost), not at each wake-up by events.
                told, self._kills_told = self._kills_told, False  # (one told meanwhile: looked for next)
                if (told or tick) and (requests := await self._store.kill_requests()):
                    self._kill(requests)
                if tick:
                    self._checked = now  # once a tick, however often the feed wakes
                    await self._store.keep_lease()
                    if swept := await self._store.sweep():
                        await self._stop_leftovers(swept)
                    # Sizes too, should a notification of output have been lost.
                    if remote := self._remote():
                        for task_id, stream, size in await self._store.sizes(remote):
                            self._grew(task_id, stream, size)
            except (psycopg.Error, OSError) as exc:
                log.warning("cannot read the events: %s (again in %s s)", exc, TICK)
            except Exception:
                # Whatever it was, the feed goes on: a stopped feed would stop every follower.
                log.exception("the events could not be delivered (again in %s s)", TICK)

    async def _stop_leftovers(self, swept: list[tuple[int, str | None, str]]) -> None:
        """Tasks of an instance that died are interrupted (their output kept as far as it was
        shipped); what they left running on this host is stopped, found by its marker."""
        for task_id, _, owner in swept:
            log.warning("task %d was running on %s, which is gone: interrupted", task_id, owner)
        here = socket.gethostname() + "-"
        markers = {marker for _, marker, owner in swept if marker and owner.startswith(here)}
        if markers and (stopped := await asyncio.to_thread(runner.kill_marked, markers)):
            log.warning("stopped %d processes left by tasks of an instance that is gone", stopped)

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._store.dsn,
                    autocommit=True,
                    connect_timeout=10,
                    application_name=self._store.connection_name("listener"),
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.info("listening to %s again", shown_dsn(self._store.dsn))
                    failures = 0
                    self.listening = True
                    self._wake.set()  # what was missed while not listening
                    async for note in conn.notifies():
                        if note.payload.startswith("o "):  # output: "o TASK STREAM SIZE"
                            task_id, stream, size = map(int, note.payload.split()[1:])
                            self._grew(task_id, stream, size)
                        else:
                            self._kills_told = self._kills_told or note.payload == "k"
                            self._wake.set()
            except (psycopg.Error, OSError) as exc:
                self.listening = False
                pause = RECONNECT[min(failures, len(RECONNECT) - 1)]
                failures += 1
                shown = shown_dsn(self._store.dsn)
                log.warning("the event listener lost %s: %s (again in %s s)", shown, exc, pause)
                await asyncio.sleep(pause)  # a back-off, not a synchronisation
