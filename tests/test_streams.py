"""Live streams: SSE of every task (`/events`), SSE of one task (`/task/:id/stream`) and the
WebSocket. Cursors resume without loss or repeat; a client that goes away frees its waiter."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pulsar_rest import runner
from pulsar_rest.events import EventBus, EventKind
from pulsar_rest.settings import Settings
from pulsar_rest.web import fanout
from pulsar_rest.web.app import RUN_BITS
from pulsar_rest.web.keys import BUS, SERVICE
from pulsar_rest.web.streams import CHUNK
from tests.conftest import Client, ClientFactory, create, eventually, finished, follow, release, waiters
from tests.test_errors import assert_envelope

# A deadline for reading what a stream should send soon: a failure, never a pace.
READ_DEADLINE = 5.0


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A stream that ends, or whose client goes away, logs nothing as an error."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- a small SSE client --------------------------------------------------------------------


@dataclass
class Message:
    """One SSE message: `event` is None for a block of comments only."""

    event: str | None = None
    data: Any = None
    id: int | None = None
    comments: list[str] = field(default_factory=list)


class SseReader:
    """Reads `resp.content` line by line: fields until a blank line, ':' lines are comments."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def message(self) -> Message | None:
        """The next message (comments included), or None when the server closed the stream."""
        msg = Message()
        data: list[str] = []
        seen = False
        async with asyncio.timeout(READ_DEADLINE):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    assert not seen, "the stream ended within a message"
                    return None
                line = raw.decode().rstrip("\r\n") if raw.endswith(b"\n") else raw.decode()
                if not line:
                    if not seen:
                        continue
                    if data:
                        msg.data = json.loads("\n".join(data))
                        msg.event = msg.event or "message"
                    return msg
                seen = True
                if line.startswith(":"):
                    msg.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    msg.event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    msg.id = int(value)

    async def event(self) -> Message:
        """The next event, skipping keep-alive comments; the stream must not end."""
        while True:
            msg = await self.message()
            assert msg is not None, "the stream ended"
            if msg.event is not None:
                return msg

    async def events(self, count: int) -> list[Message]:
        return [await self.event() for _ in range(count)]

    async def until(self, done: Any) -> list[Message]:
        """Events up to and including the first for which `done(event)` holds."""
        found: list[Message] = []
        while not found or not done(found[-1]):
            found.append(await self.event())
        return found

    async def rest(self) -> list[Message]:
        """Every event until the server closes the stream."""
        found: list[Message] = []
        while (msg := await self.message()) is not None:
            if msg.event is not None:
                found.append(msg)
        return found


async def open_sse(client: Client, path: str, **kwargs: Any) -> SseReader:
    resp = await client.get(path, **kwargs)
    assert resp.status == 200, await resp.text()
    return SseReader(resp)


def cursor(how: str, query_name: str, value: int) -> dict[str, Any]:
    """Request arguments resuming at `value`: as browsers do (header) or by the query."""
    if how == "header":
        return {"headers": {"Last-Event-ID": str(value)}}
    return {"params": {query_name: str(value)}}


async def log_of(client: Client, task_id: int) -> bytes:
    resp = await client.get(f"/task/{task_id}/log")
    assert resp.status == 200
    return await resp.read()


def bus_seq(client: Client) -> int:
    assert client.app is not None
    return client.app[BUS].seq


def kept_since(client: Client, seq: int) -> list[int]:
    """The oracle: numbers of the create/change events the server has after `seq`."""
    assert client.app is not None
    return [event.seq for event in client.app[BUS].since(seq)]


def kept_events(client: Client, seq: int) -> list[tuple[str, int]]:
    assert client.app is not None
    return [(event.kind.value, event.task_id) for event in client.app[BUS].since(seq)]


# -- GET /events ---------------------------------------------------------------------------


async def test_events_headers_and_a_task_lifecycle(client: Client, gates: Path) -> None:
    start = bus_seq(client)
    sse = await open_sse(client, "/events")
    assert sse.resp.headers["Content-Type"] == "text/event-stream"
    assert sse.resp.headers["Cache-Control"] == "no-cache"
    assert sse.resp.headers["X-Accel-Buffering"] == "no"
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    # A gate holds the task running, so the change to "running" is read while it is true
    # (the events carry the task as it is when they are sent, not as it was).
    task = await create(client, "gate[a]")
    created, running = await sse.events(2)
    assert created.event == "task.create"
    assert created.data["event"] == "task.create"
    assert created.data["task"]["id"] == task["id"]
    assert created.data["task"]["status"] in ("created", "running")
    assert "output" not in created.data["task"]
    assert running.event == "task.change"
    assert running.data["task"]["status"] == "running"
    release(gates, "a")
    (done,) = await sse.events(1)
    assert done.event == "task.change"
    assert done.data["task"]["status"] == "finished"
    assert done.data["task"]["outputSize"] == len(await log_of(client, task["id"]))
    ids = [m.id for m in (created, running, done)]
    assert ids == [m.data["seq"] for m in (created, running, done)]
    assert ids == kept_since(client, start)  # all of them, increasing, none twice
    sse.resp.close()
    await finished(client, task["id"])


async def test_events_ok_task_create_then_two_changes(client: Client) -> None:
    start = bus_seq(client)
    sse = await open_sse(client, "/events")
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    task = await create(client, "ok")
    got = await sse.events(3)
    assert [m.event for m in got] == ["task.create", "task.change", "task.change"]
    assert all(m.data["task"]["id"] == task["id"] for m in got)
    assert got[-1].data["task"]["status"] == "finished"
    assert [m.id for m in got] == kept_since(client, start)
    sse.resp.close()
    await finished(client, task["id"])


@pytest.mark.parametrize("how", ["header", "query"])
async def test_events_resume_without_loss_or_repeat(client: Client, how: str) -> None:
    sse = await open_sse(client, "/events")
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    first = await create(client, "ok")
    seen = await sse.events(3)  # created, running, finished
    assert seen[-1].data["task"]["id"] == first["id"]
    assert seen[-1].data["task"]["status"] == "finished"
    last = seen[-1].id
    assert last is not None
    sse.resp.close()
    await eventually(lambda: waiters(client) == 0, what="the stream to go")

    missed = [await create(client, "ok", app=f"app{i}") for i in range(3)]
    for task in missed:
        await finished(client, task["id"])
    expected = kept_since(client, last)
    assert len(expected) == 9  # created, running, finished for each

    sse = await open_sse(client, "/events", **cursor(how, "since", last))
    got = await sse.events(len(expected))
    assert [m.id for m in got] == expected
    assert [m.data["seq"] for m in got] == expected
    assert [(m.event, m.data["task"]["id"]) for m in got] == kept_events(client, last)
    assert {m.data["task"]["id"] for m in got} == {t["id"] for t in missed}
    # Nothing more was queued: the next event is the next thing that happens.
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    after = await create(client, "ok")
    (nxt,) = await sse.events(1)
    assert nxt.event == "task.create" and nxt.data["task"]["id"] == after["id"]
    assert nxt.id == expected[-1] + 1
    sse.resp.close()
    await finished(client, after["id"])


async def test_events_last_event_id_wins_over_since(client: Client) -> None:
    start = bus_seq(client)
    task = await create(client, "ok")
    await finished(client, task["id"])
    # Both cursors are good: the query's would replay three events, the header's two.
    sse = await open_sse(client, f"/events?since={start}", headers={"Last-Event-ID": str(start + 1)})
    got = await sse.events(2)
    assert [m.id for m in got] == kept_since(client, start + 1)
    assert [m.event for m in got] == ["task.change", "task.change"]
    sse.resp.close()


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "9" * 19])
async def test_events_bad_last_event_id_is_a_400(client: Client, value: str) -> None:
    resp = await client.get("/events", headers={"Last-Event-ID": value})
    assert resp.status == 400
    body = await resp.json()
    assert_envelope(body, 400)
    assert "Last-Event-ID" in body["error"]["message"]


async def test_events_burst_each_creation_once_in_order(client: Client) -> None:
    start = bus_seq(client)
    sse = await open_sse(client, "/events")
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    tasks = await asyncio.gather(*(create(client, "ok", app=f"app{i}") for i in range(50)))
    ids = {t["id"] for t in tasks}
    got: list[Message] = []
    changes: dict[int, int] = {}
    while sum(changes.values()) < 100:
        msg = await sse.event()
        got.append(msg)
        if msg.event == "task.change":
            changes[msg.data["task"]["id"]] = changes.get(msg.data["task"]["id"], 0) + 1
    creates = [m for m in got if m.event == "task.create"]
    assert sorted(m.data["task"]["id"] for m in creates) == sorted(ids)
    assert [m.id for m in creates] == sorted(m.id for m in creates if m.id is not None)
    assert changes == dict.fromkeys(ids, 2)
    event_ids = [m.id for m in got]
    assert event_ids == kept_since(client, start)  # every event once, in order, none missing
    sse.resp.close()
    for task in tasks:
        await finished(client, task["id"])


async def test_events_cursor_from_the_future_resets(client: Client) -> None:
    start = bus_seq(client)
    assert start == 1 << RUN_BITS  # the first run of a fresh data directory
    future = start + 10**6
    sse = await open_sse(client, "/events", headers={"Last-Event-ID": str(future)})
    reset = await sse.event()
    assert reset.event == "reset"
    assert reset.data["seq"] == bus_seq(client) == start
    assert reset.id == start
    assert str(future) in reset.data["message"] and "ahead" in reset.data["message"]
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    task = await create(client, "ok")
    live = await sse.event()
    assert live.event == "task.create" and live.data["task"]["id"] == task["id"]
    assert live.id == start + 1
    sse.resp.close()
    await finished(client, task["id"])


async def test_events_cursor_older_than_the_kept_events_resets(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pulsar_rest.web.app.EventBus", functools.partial(EventBus, keep=4))
    client = await make_client()
    start = bus_seq(client)
    for _ in range(2):  # six events kept as four
        await finished(client, (await create(client, "ok"))["id"])
    # The first event of this run was dropped: a cursor at it cannot be answered any more.
    sse = await open_sse(client, "/events", params={"since": str(start + 1)})
    reset = await sse.event()
    assert reset.event == "reset"
    assert reset.data["seq"] == reset.id == bus_seq(client)
    assert "older" in reset.data["message"]
    await eventually(lambda: waiters(client) >= 1, what="the stream to wait")
    task = await create(client, "ok")
    live = await sse.event()
    assert live.event == "task.create" and live.data["task"]["id"] == task["id"]
    sse.resp.close()
    await finished(client, task["id"])


def test_event_bus_horizon() -> None:
    bus = EventBus(keep=3)
    for task_id in range(1, 6):
        created = bus.publish(EventKind.CREATED, task_id)
        output = bus.publish(EventKind.OUTPUT, task_id)  # neither kept nor numbered
        assert output.seq == created.seq == task_id
    assert bus.seq == 5 and bus.published == 10
    # Kept: 3, 4, 5; a cursor at 2 (the last one dropped) still gets all that came after it.
    assert [e.seq for e in bus.since(2)] == [3, 4, 5]
    assert [e.kind for e in bus.since(2)] == [EventKind.CREATED] * 3
    assert [e.seq for e in bus.since(4)] == [5]
    assert bus.since(5) == []
    with pytest.raises(LookupError, match="older"):
        bus.since(1)
    with pytest.raises(LookupError, match="ahead"):
        bus.since(6)


async def test_events_keepalive_while_idle(make_client: ClientFactory) -> None:
    client = await make_client(keepalive=0.05)
    sse = await open_sse(client, "/events")
    msg = await sse.message()
    assert msg is not None
    assert msg.event is None and msg.comments == ["keep-alive"]
    sse.resp.close()


# -- GET /task/:id/stream ------------------------------------------------------------------


def check_output_events(events: list[Message], start: int) -> bytes:
    """The output the events carry, checking each starts where the previous one ended and
    has the next byte offset as its id."""
    offset = start
    out = b""
    for msg in events:
        if msg.event != "output":
            assert msg.id == offset, msg
            continue
        chunk = msg.data["output"].encode()
        assert msg.data["offset"] == offset
        assert msg.id == offset + len(chunk)
        offset += len(chunk)
        out += chunk
    return out


async def test_task_stream_live_output_states_and_end(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[a]"))["id"]
    sse = await open_sse(client, f"/task/{task_id}/stream")
    assert sse.resp.headers["Content-Type"] == "text/event-stream"
    assert sse.resp.headers["Cache-Control"] == "no-cache"
    assert sse.resp.headers["X-Accel-Buffering"] == "no"
    first = await sse.event()
    assert first.event == "state" and first.id == 0
    assert first.data["id"] == task_id and "output" not in first.data
    # The output arrives while the task still waits at its gate.
    before = [first, *await sse.until(lambda m: "waiting for a" in str(m.data.get("output")))]
    task = await (await client.get(f"/task/{task_id}")).json()
    assert task["status"] == "running"
    release(gates, "a")
    after = await sse.rest()  # the server ends the stream
    events = before + after
    assert [m.event for m in events[-2:]] == ["state", "end"]
    assert events[-2].data["status"] == events[-1].data["status"] == "finished"
    states = [m.data["status"] for m in events if m.event == "state"]
    assert states[-1] == "finished" and states.count("finished") == 1
    assert "running" in states
    log = await log_of(client, task_id)
    assert check_output_events(events, 0) == log
    assert events[-1].id == len(log) == events[-1].data["outputSize"]
    await finished(client, task_id)


@pytest.mark.parametrize("how", ["header", "query"])
async def test_task_stream_resumes_from_an_offset(client: Client, how: str) -> None:
    task_id = (await create(client, "lines[50]"))["id"]
    await finished(client, task_id)
    log = await log_of(client, task_id)
    offset = log.index(b"line 17\n")
    sse = await open_sse(client, f"/task/{task_id}/stream", **cursor(how, "offset", offset))
    events = await sse.rest()
    assert events[0].event == "state" and events[0].id == offset
    assert events[-1].event == "end" and events[-1].id == len(log)
    assert [m.event for m in events[1:-1]] == ["output"] * (len(events) - 2)
    assert check_output_events(events, offset) == log[offset:]


async def test_task_stream_at_the_end_sends_no_output(client: Client) -> None:
    task_id = (await create(client, "ok"))["id"]
    await finished(client, task_id)
    size = len(await log_of(client, task_id))
    sse = await open_sse(client, f"/task/{task_id}/stream", headers={"Last-Event-ID": str(size)})
    events = await sse.rest()
    assert [(m.event, m.id) for m in events] == [("state", size), ("end", size)]


@pytest.mark.parametrize("how", ["header", "query"])
async def test_task_stream_offset_past_the_end_is_a_410(client: Client, how: str) -> None:
    task_id = (await create(client, "ok"))["id"]
    await finished(client, task_id)
    size = len(await log_of(client, task_id))
    resp = await client.get(f"/task/{task_id}/stream", **cursor(how, "offset", size + 1))
    assert resp.status == 410
    body = await resp.json()
    assert_envelope(body, 410)
    assert "past the end" in body["error"]["message"]


@contextlib.asynccontextmanager
async def bytes_on_their_way(client: Client, gates: Path) -> AsyncIterator[tuple[int, int]]:
    """A task whose last output is taken in but held from its file (the log's writes wait)
    while in the block: its id and the bytes taken in."""
    assert client.app is not None
    task_id = (await create(client, "gate[a]"))["id"]
    output = (await client.app[SERVICE].get(task_id)).output
    await eventually(lambda: output.size > 0, what="the first line")
    held = threading.Event()
    writer = output._writer
    assert writer is not None
    blocked = writer.submit(held.wait)  # the log's writes wait behind this
    try:
        release(gates, "a")
        await eventually(lambda: output.backlog > 0, what="output taken in, not yet in the file")
        yield task_id, output.taken
    finally:
        held.set()  # also after a failure: the task's end waits for its writes
        await blocked


async def test_task_stream_from_bytes_on_their_way_to_the_file(client: Client, gates: Path) -> None:
    """A byte is in the file (and so in a Range read of GET /task/:id/log, which is how the
    console starts) a moment before it counts in the output's size: an offset up to the
    bytes taken in is served, and the stream goes on from it once they are counted."""
    async with bytes_on_their_way(client, gates) as (task_id, taken):
        sse = await open_sse(client, f"/task/{task_id}/stream", params={"offset": str(taken)})
        first = await sse.event()
        assert first.event == "state" and first.id == taken
    events = await sse.rest()
    assert events[-1].event == "end" and events[-1].id == taken == len(await log_of(client, task_id))
    assert [m.event for m in events if m.event == "output"] == []
    resp = await client.get(f"/task/{task_id}/stream", params={"offset": str(taken + 1)})
    assert resp.status == 410


async def test_output_long_poll_from_bytes_on_their_way_to_the_file(client: Client, gates: Path) -> None:
    """As the stream: a long-poll from an offset up to the bytes taken in waits for them,
    as for any output, instead of taking the offset for gone; one past them is a 410."""
    async with bytes_on_their_way(client, gates) as (task_id, taken):
        past = await client.get(f"/task/{task_id}/output", params={"offset": str(taken + 1), "timeout": "5"})
        assert past.status == 410
        assert_envelope(await past.json(), 410)
        before = waiters(client)
        polled = asyncio.ensure_future(
            client.get(f"/task/{task_id}/output", params={"offset": str(taken), "timeout": "30"})
        )
        await eventually(lambda: waiters(client) > before, what="the long-poll to wait")
        assert not polled.done()
    resp = await polled
    assert resp.status == 200
    body = await resp.json()
    assert (body["offset"], body["nextOffset"], body["output"]) == (taken, taken, "")
    assert body["complete"] and body["size"] == taken == len(await log_of(client, task_id))


async def test_task_stream_unknown_task_is_a_404(client: Client) -> None:
    resp = await client.get("/task/4242/stream")
    assert resp.status == 404
    body = await resp.json()
    assert_envelope(body, 404)
    assert "4242" in body["error"]["message"]


async def test_task_stream_keeps_characters_whole(client: Client, gates: Path) -> None:
    task_id = (await create(client, "utf8[u]"))["id"]
    sse = await open_sse(client, f"/task/{task_id}/stream")
    # Half of "é" is written before the gate: it is held back, not sent as a broken character.
    events = await sse.until(lambda m: m.event == "output")
    assert events[-1].data["output"] == "start "
    release(gates, "u")
    events += await sse.rest()
    log = await log_of(client, task_id)
    assert check_output_events(events, 0) == log
    text = "".join(m.data["output"] for m in events if m.event == "output")
    assert text == log.decode()
    assert text.startswith("start é end\nbad \ufffd\ufffd bytes\n")
    await finished(client, task_id)


async def test_task_stream_from_inside_a_character(client: Client, gates: Path) -> None:
    task_id = (await create(client, "utf8[v]"))["id"]
    release(gates, "v")
    await finished(client, task_id)
    log = await log_of(client, task_id)
    inside = log.index("é".encode()) + 1
    sse = await open_sse(client, f"/task/{task_id}/stream", params={"offset": str(inside)})
    events = await sse.rest()
    outputs = [m for m in events if m.event == "output"]
    # The event says where its text starts, and its id where the next one does.
    assert outputs[0].data["offset"] == inside
    assert outputs[-1].id == len(log)
    assert "".join(m.data["output"] for m in outputs) == log[inside:].decode(errors="replace")


async def test_task_stream_sends_what_changed_during_a_slow_write(
    client: Client, gates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client slow to take an event: what changes meanwhile is still sent, at once."""
    assert client.app is not None
    service = client.app[SERVICE]
    go = asyncio.Event()
    real_spawn = runner.spawn

    async def held_spawn(*args: Any, **kwargs: Any) -> runner.ChildProcess:
        await go.wait()  # the task stays "created" until the stream has started
        return await real_spawn(*args, **kwargs)

    real_write = web.StreamResponse.write

    async def slow_write(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        if bytes(data).startswith(b"event: state"):
            task = await service.get(1)
            if b'"status": "created"' in data:
                go.set()  # the task starts while this event is being written ...
                await eventually(lambda: task.status == "running", what="the start")
            elif b'"status": "running"' in data:
                # ... and writes its first line while this one is
                await eventually(lambda: task.output.size > 0, what="the first line")
        await real_write(self, data)

    monkeypatch.setattr(runner, "spawn", held_spawn)
    monkeypatch.setattr(web.StreamResponse, "write", slow_write)
    start = bus_seq(client)
    creating = asyncio.create_task(create(client, "gate[s]"))
    await eventually(lambda: bus_seq(client) == start + 1, what="the task to be recorded")
    sse = await open_sse(client, "/task/1/stream")
    events = await sse.until(lambda m: m.event == "output")
    assert [(m.event, m.data.get("status")) for m in events] == [
        ("state", "created"),
        ("state", "running"),
        ("output", None),
    ]
    assert events[-1].data["output"] == "waiting for s\n"
    release(gates, "s")
    assert (await creating)["id"] == 1
    await finished(client, 1)


async def test_task_stream_of_a_task_pruned_meanwhile_says_so_and_ends(
    make_client: ClientFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(retain_tasks=1)
    assert client.app is not None
    service = client.app[SERVICE]
    big = await finished(client, (await create(client, "lines[200000]"))["id"])
    assert big["outputSize"] > 2 * CHUNK  # more than one output event
    log = settings.data_dir / "logs" / f"{big['id']}.log"
    real_write = web.StreamResponse.write
    pruned = False

    async def slow_write(self: web.StreamResponse, data: bytes | bytearray | memoryview) -> None:
        nonlocal pruned
        if bytes(data).startswith(b"event: output") and not pruned:
            # While the first chunk is on its way, a newer task ends: the big one is pruned.
            pruned = True
            newer = await service.create("other", "prod", "ok")
            await service.wait_ended(newer, READ_DEADLINE)
            await eventually(lambda: not log.exists(), what="the pruning")
        await real_write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", slow_write)
    sse = await open_sse(client, f"/task/{big['id']}/stream")
    events = await sse.rest()
    assert [m.event for m in events] == ["state", "output", "gone"]
    assert events[1].data["offset"] == 0 and events[2].id == len(events[1].data["output"])
    assert events[2].data["message"] == f"task {big['id']} was removed from the history"


# -- GET /websocket ------------------------------------------------------------------------


async def ws_receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    async with asyncio.timeout(READ_DEADLINE):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


async def test_websocket_output_concatenates_to_the_log(client: Client) -> None:
    start = bus_seq(client)
    ws = await client.ws_connect("/websocket")
    await eventually(lambda: waiters(client) >= 1, what="the socket to wait")
    task_id = (await create(client, "lines[2000]"))["id"]
    messages: list[dict[str, Any]] = []
    while sum(m["event"] == "task.change" for m in messages) < 2:  # running, then ended
        messages.append(await ws_receive(ws))
    log = await log_of(client, (await finished(client, task_id))["id"])
    # A task's output comes before its change: its end follows its last byte, and each
    # change says the status the task had then.
    assert [m["status"] for m in messages if m["event"] == "task.change"] == ["running", "finished"]
    assert messages[0]["event"] == "task.create" and messages[0]["status"] == "created"
    assert messages[0]["task"]["id"] == task_id and "output" not in messages[0]["task"]
    assert [m["seq"] for m in messages if m["event"] != "task.output"] == kept_since(client, start)
    assert all(m["task"]["id"] == task_id for m in messages if m["event"] != "task.output")
    outputs = [m for m in messages if m["event"] == "task.output"]
    offset = 0
    for msg in outputs:
        assert set(msg) == {"event", "taskId", "offset", "output"}
        assert msg["taskId"] == task_id
        assert msg["offset"] == offset
        offset += len(msg["output"].encode())
    assert "".join(m["output"] for m in outputs).encode() == log
    await ws.close()
    await eventually(lambda: waiters(client) == 0, what="the socket to go")


async def test_websocket_output_is_sent_as_deltas(client: Client, gates: Path) -> None:
    ws = await client.ws_connect("/websocket")
    await eventually(lambda: waiters(client) >= 1, what="the socket to wait")
    task_id = (await create(client, "gate[a]"))["id"]
    messages = [await ws_receive(ws)]
    while messages[-1]["event"] != "task.output":
        messages.append(await ws_receive(ws))
    assert [m["event"] for m in messages] == ["task.create", "task.change", "task.output"]
    assert messages[1]["task"]["status"] == "running"
    assert messages[-1]["offset"] == 0 and messages[-1]["output"] == "waiting for a\n"
    release(gates, "a")
    log = await log_of(client, (await finished(client, task_id))["id"])
    rest: list[dict[str, Any]] = []
    while sum(len(m["output"].encode()) for m in rest if m["event"] == "task.output") < len(
        log
    ) - 14 or not any(m["event"] == "task.change" for m in rest):
        rest.append(await ws_receive(ws))
    outputs = [m for m in rest if m["event"] == "task.output"]
    assert outputs[0]["offset"] == len(b"waiting for a\n")
    assert "".join(m["output"] for m in outputs).encode() == log[14:]
    assert [m["task"]["status"] for m in rest if m["event"] == "task.change"] == ["finished"]
    await ws.close()


async def test_websocket_since_replays_creations(client: Client) -> None:
    before = await create(client, "ok")
    await finished(client, before["id"])
    since = bus_seq(client)
    later = [await create(client, "ok", app=f"app{i}") for i in range(2)]
    for task in later:
        await finished(client, task["id"])
    expected = kept_since(client, since)
    ws = await client.ws_connect("/websocket", params={"since": str(since)})
    events: list[dict[str, Any]] = []
    while len(events) < len(expected):
        msg = await ws_receive(ws)
        if msg["event"] != "task.output":
            events.append(msg)
    assert [m["seq"] for m in events] == expected
    creates = [m["task"]["id"] for m in events if m["event"] == "task.create"]
    assert creates == [t["id"] for t in later]
    await ws.close()


async def test_websocket_wakes_on_every_event(client: Client) -> None:
    """An event published right after the socket looked for news and found none still
    wakes it, whenever it comes (a lost wake-up would leave the socket silent)."""
    assert client.app is not None
    bus = client.app[BUS]
    task_id = (await create(client, "ok"))["id"]
    await finished(client, task_id)
    ws = await client.ws_connect("/websocket")
    loop = asyncio.get_running_loop()

    def publish_after(rounds: int) -> None:
        if rounds:
            loop.call_soon(publish_after, rounds - 1)
        else:
            bus.publish(EventKind.CHANGED, task_id)

    for rounds in range(12):
        await eventually(lambda: waiters(client) >= 1, what="the socket to wait")
        first = bus.publish(EventKind.CHANGED, task_id)
        publish_after(rounds)
        assert (await ws_receive(ws))["seq"] == first.seq
        assert (await ws_receive(ws))["seq"] == first.seq + 1, f"lost after {rounds} rounds"
    await ws.close()


async def test_websocket_bad_since_is_a_400(client: Client) -> None:
    resp = await client.get("/websocket", params={"since": "x"})
    assert resp.status == 400
    assert_envelope(await resp.json(), 400)


# -- clients that go away ------------------------------------------------------------------


async def test_closed_streams_free_their_waiters(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[w]"))["id"]
    await follow(client, task_id, lambda t: "waiting for w" in t["output"])
    streams: list[aiohttp.ClientResponse] = []
    for _ in range(5):
        streams.append((await open_sse(client, "/events")).resp)
        sse = await open_sse(client, f"/task/{task_id}/stream")
        await sse.until(lambda m: m.event == "output")
        streams.append(sse.resp)
    await eventually(lambda: waiters(client) >= 10, what="ten waiters")
    for resp in streams:
        resp.close()
    await eventually(lambda: waiters(client) == 0, timeout=3, what="the waiters to go")
    release(gates, "w")
    await finished(client, task_id)


async def test_closed_websockets_free_their_waiters(client: Client) -> None:
    sockets = [await client.ws_connect("/websocket") for _ in range(5)]
    await eventually(lambda: waiters(client) == 5, what="five waiters")
    for ws in sockets:
        await ws.close()
    # Whether the handler sees the close or is cancelled as the connection goes, its wait ends.
    await eventually(lambda: waiters(client) == 0, timeout=3, what="the waiters to go")
    # And the service still answers the next socket at once.
    ws = await client.ws_connect("/websocket")
    await eventually(lambda: waiters(client) == 1, what="the new socket to wait")
    task = await create(client, "ok")
    assert (await ws_receive(ws))["task"]["id"] == task["id"]
    await ws.close()
    await finished(client, task["id"])


async def test_a_stalled_follower_holds_a_bounded_buffer_and_delays_nobody(client: Client) -> None:
    """A client that stops reading its stream: the server keeps about a message for it (its
    connection's buffer; then its writes wait), while the task runs to its end at once and
    another follower gets every byte."""
    task_id = (await create(client, f"bytes[{16 * 1024 * 1024}]"))["id"]
    assert client.server.host is not None and client.server.port is not None
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((client.server.host, client.server.port))
    try:
        stalled.sendall(f"GET /task/{task_id}/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sse = await open_sse(client, f"/task/{task_id}/stream")
        events = await sse.rest()
        log = await log_of(client, task_id)
        assert check_output_events(events, 0) == log and len(log) >= 16 * 1024 * 1024
        assert events[-1].event == "end" and events[-1].data["status"] == "finished"
        assert client.server.runner is not None
        server = client.server.runner.server
        assert server is not None
        buffered = [
            conn.transport.get_write_buffer_size()
            for conn in server.connections
            if conn.transport is not None and not conn.transport.is_closing()
        ]
        stuck = max(buffered)
        assert 0 < stuck < 2 * CHUNK * 2, buffered  # waiting, with about a message held
    finally:
        stalled.close()


async def test_followers_make_a_bounded_amount_of_messages_a_tick() -> None:
    loop = asyncio.get_running_loop()
    budget = fanout.Budget(100)
    before = int(loop.time() // fanout.TICK)
    await budget.spend(250)  # more than a tick's, at once: this tick's budget is spent
    await budget.spend(1)  # so this one waits for the next tick
    assert int(loop.time() // fanout.TICK) > before


async def test_a_task_s_messages_go_when_its_last_follower_leaves() -> None:
    """What followers were sent (up to a MiB a message) is not held once they have gone."""
    messages: fanout.Messages[bytes] = fanout.Messages(fanout.Budget(100), fanout.Budget(100))
    made: list[bytes] = []

    def maker(message: bytes) -> Callable[[], Awaitable[tuple[bytes, bool]]]:
        async def make() -> tuple[bytes, bool]:
            made.append(message)
            return message, True

        return make

    with messages.following(1):
        with messages.following(1), messages.following(2):
            await messages.made_once((1, 0, 10), maker(b"one"))
            await messages.made_once((2, 0, 10), maker(b"two"))
            assert await messages.made_once((1, 0, 10), maker(b"again")) == b"one"  # kept
            text = messages.text(2, 10)
        # Task 2's last follower has gone; task 1 still has one. A long-poll follower asks
        # again at once: its task's messages and text are still there for it.
        assert await messages.made_once((2, 0, 10), maker(b"again")) == b"two"
        assert messages.text(2, 10) is text
        with messages.following(2):
            pass  # a last ask: from its end, a while without followers
        await eventually(lambda: messages.text(2, 10) is not text, what="task 2's text gone")
        assert await messages.made_once((2, 0, 10), maker(b"two, again")) == b"two, again"
        assert await messages.made_once((1, 0, 10), maker(b"again")) == b"one"
    await eventually(lambda: (1, 0, 10) not in messages._made, what="task 1's messages gone")
    assert await messages.made_once((1, 0, 10), maker(b"one, again")) == b"one, again"
    assert made == [b"one", b"two", b"two, again", b"one, again"]


def test_output_escaped_once_for_all_followers_is_what_json_would_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Followers at scattered offsets, some far behind, some with small limits, one from an
    offset inside a character: each gets exactly json.dumps's text of its range."""
    escaped, answered = 0, 0
    real = fanout._escape

    def escape(data: bytes) -> bytes:
        nonlocal escaped
        escaped += len(data)
        return real(data)

    monkeypatch.setattr(fanout, "_escape", escape)
    rng = random.Random(16)
    words = ["deploy", "é", "日本", "🚀", '"quoted"', "back\\slash", "\t", "\x1b[32mok\x1b[0m", "\r"]
    text = fanout.JsonText(keep=2000)
    offsets = [0] * 20 + [1]  # the last one inside the "é" the log starts with
    log = "é line\n".encode()
    for _ in range(300):
        lines = (" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(0, 4)))
        log += "".join(line + "\n" for line in lines).encode()
        for i in rng.sample(range(len(offsets)), k=rng.randint(1, len(offsets))):
            limit = rng.choice([len(log), 300]) if i % 5 == 0 else len(log)
            data = log[offsets[i] : offsets[i] + limit]
            if b"\n" not in data:
                continue
            data = data[: data.rindex(b"\n") + 1]
            assert text.escaped(offsets[i], data) == json.dumps(data.decode(errors="replace"))[1:-1].encode()
            offsets[i] += len(data)
            answered += len(data)
    assert escaped < answered / 5  # mostly escaped once for all, not once an answer
    # What an answer costs the tick's budget: what it alone escapes.
    start = offsets[0]
    assert text.cost(start, len(log)) == 0  # a join of pieces
    assert text.cost(start, len(log) + 100) == 100  # and output no answer held yet
    assert text.cost(start + 1, len(log)) == len(log) - start - 1  # from no piece's start
    assert text.cost(start, len(log) - 1) == len(log) - 1 - start  # to inside a piece: escaped alone
    assert text._starts[0] > 0 and len(log) - text._starts[0] < 3 * 2000  # what is far behind has gone


def test_escaped_output_is_not_cut_inside_a_character() -> None:
    # An answer may end inside a character (one cut by its limit, the end of a stream's
    # chunk): the next answer over that point still has the character whole.
    text = fanout.JsonText(keep=100)
    whole = "abcé\n".encode()
    assert text.escaped(0, whole[:4]) == b"abc\\ufffd"
    assert text.escaped(0, whole) == b"abc\\u00e9\\n"


async def test_a_task_s_text_goes_while_another_task_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task's messages and text go a while after its own last follower left, however
    often another task's long-poll followers come and go."""
    # A second: task 1's text is dropped only if the loop stalls that long between two asks.
    monkeypatch.setattr(fanout, "DELAY", 1.0)
    messages: fanout.Messages[bytes] = fanout.Messages(fanout.Budget(100), fanout.Budget(100))
    with messages.following(2):
        left = messages.text(2, 10)
    busy = messages.text(1, 10)

    def asked_again() -> bool:
        with messages.following(1):  # a long-poll of task 1: here only while it asks
            pass
        return messages._texts.get(2) is not left

    await eventually(asked_again, what="task 2's text gone")
    assert messages.text(1, 10) is busy


async def test_followers_that_ask_at_once_for_a_message_have_it_made_once() -> None:
    messages: fanout.Messages[bytes] = fanout.Messages(fanout.Budget(100), fanout.Budget(100))
    release = asyncio.Event()
    makes = 0

    async def make() -> tuple[bytes, bool]:
        nonlocal makes
        makes += 1
        await release.wait()  # a read from the file, say: the others ask meanwhile
        return b"message", True

    asking = [asyncio.ensure_future(messages.made_once((1, 0, 10), make)) for _ in range(5)]
    await eventually(lambda: makes == 1, what="the first make")
    release.set()
    assert await asyncio.gather(*asking) == [b"message"] * 5
    assert makes == 1


async def test_when_a_message_s_maker_goes_away_the_others_make_it() -> None:
    messages: fanout.Messages[bytes] = fanout.Messages(fanout.Budget(100), fanout.Budget(100))
    started = asyncio.Event()

    async def stuck() -> tuple[bytes, bool]:
        started.set()
        await asyncio.Event().wait()  # its client leaves before it is made
        raise AssertionError("not reached")

    async def make() -> tuple[bytes, bool]:
        assert first.done()  # made once the first's make was given up, not beside it
        return b"made here", True

    first = asyncio.ensure_future(messages.made_once((1, 0, 10), stuck))
    await started.wait()
    second = asyncio.ensure_future(messages.made_once((1, 0, 10), make))
    first.cancel()
    assert await second == b"made here"
    assert first.cancelled()
