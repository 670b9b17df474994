"""Live streams: server-sent events (`/events`, `/task/:id/stream`) and a WebSocket.

Each stream follows a cursor, an event number or a byte offset, so a client that comes back
with `Last-Event-ID` (which browsers send by themselves) misses nothing. Keep-alive comments
and `X-Accel-Buffering: no` keep proxies from buffering or cutting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import WSMsgType, web

from pulsar_rest.events import CursorGone, Event, EventBus, all_topic, changes_topic, task_topic
from pulsar_rest.output import complete_chars
from pulsar_rest.service import TaskService
from pulsar_rest.tasks import Task
from pulsar_rest.web import fanout, params
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.fanout import Messages
from pulsar_rest.web.keys import BUS, GATEKEEPER, RULES, SERVICE, SETTINGS, STREAM_MESSAGES
from pulsar_rest.web.present import summary

# Most output bytes in one stream message.
CHUNK = 256 * 1024

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
}


# Is the stream's identity still valid? Asked before each message; GitHub is asked again
# only once the last answer's time (--auth-cache-ttl) is up.
Guard = Callable[[], Awaitable[bool]]
_UNAUTHORIZED = {"message": "your credentials are no longer valid: sign in again"}


def _guard(request: web.Request) -> Guard:
    rule = request.app[RULES][request.match_info.route]

    async def still_admitted() -> bool:
        try:
            await request.app[GATEKEEPER].recheck(request, rule)
        except ApiError:
            return False
        return True

    return still_admitted


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"event: {event}\n" + ("" if event_id is None else f"id: {event_id}\n")
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _cursor(request: web.Request, query_name: str) -> int | None:
    """The cursor to resume from: Last-Event-ID (sent by reconnecting browsers) or the query."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        return params.int_param(request, query_name)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(400, f"Last-Event-ID must be a whole number, not {raw[:40]!r}")
    return int(raw)


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    return response


def _change(event: Event, tasks: Mapping[int, Task]) -> dict[str, Any]:
    # `status` is the task's at the event; `task` is the task now (a replayed event may be
    # older than the task it shows), or None once the task was pruned from the history.
    task = tasks.get(event.task_id)
    return {
        "event": event.kind.value,
        "seq": event.seq,
        "status": event.status,
        "task": None if task is None else summary(task),
    }


async def events(request: web.Request) -> web.StreamResponse:
    """SSE of every task created and changed (`task.create`, `task.change`), ids = cursors."""
    bus = request.app[BUS]
    cursor = _cursor(request, "since")
    await params.reach_cursor(request, cursor)
    response = await _open_sse(request)
    if cursor is None:
        cursor = bus.seq
    with _client_may_leave():
        await _send_events(response, request, cursor, _guard(request))
    return response


async def _send_events(response: web.StreamResponse, request: web.Request, cursor: int, guard: Guard) -> None:
    bus, service = request.app[BUS], request.app[SERVICE]
    keepalive = request.app[SETTINGS].keepalive
    while not bus.closed:
        if not await guard():
            await response.write(_sse("unauthorized", _UNAUTHORIZED))
            break
        try:
            pending = bus.since(cursor)
        except CursorGone as exc:
            # The client must list again; then it follows from here.
            await response.write(_sse("reset", {"message": str(exc), "seq": bus.seq}, bus.seq))
            cursor = bus.seq
            continue
        tasks = await service.find_many({event.task_id for event in pending})
        for event in pending:
            await response.write(_sse(event.kind.value, _change(event, tasks), event.seq))
            cursor = event.seq
        if not pending and await bus.wait(changes_topic(), keepalive) is None and not bus.closed:
            await response.write(b": keep-alive\n\n")


async def task_stream(request: web.Request) -> web.StreamResponse:
    """SSE of one task: `state` events, `output` chunks (id = the next byte offset), and
    `end` once it has ended and all its output was sent."""
    bus, service = request.app[BUS], request.app[SERVICE]
    keepalive = request.app[SETTINGS].keepalive
    task = await params.task(request)
    offset = _cursor(request, "offset") or 0
    await params.reach_offset(request, task, offset)
    response = await _open_sse(request)
    messages = request.app[STREAM_MESSAGES]
    with _client_may_leave(), messages.following(task.id):
        await _send_task(response, bus, service, messages, task, offset, keepalive, _guard(request))
    return response


async def _send_task(
    response: web.StreamResponse,
    bus: EventBus,
    service: TaskService,
    messages: Messages[tuple[bytes, int]],
    task: Task,
    offset: int,
    keepalive: float,
    guard: Guard,
) -> None:
    state_seq = task.state_seq  # of the summary sent now
    await response.write(_sse("state", summary(task), offset))
    while True:
        if not await guard():
            await response.write(_sse("unauthorized", _UNAUTHORIZED, offset))
            break
        if offset < task.output.size:
            start = offset
            message, offset = await _output_event(messages, task, offset)
            if offset > start:
                await messages.sent.spend(len(message))
                await response.write(message)
                if offset < task.output.size:
                    # A follower that lags reads on at once, a message a turn of the loop:
                    # the task's pipe is read between two, however many lag.
                    await asyncio.sleep(0)
                continue
            if await service.find(task.id) is None:  # its log was read while it was pruned
                gone = f"task {task.id} was removed from the history"
                await response.write(_sse("gone", {"message": gone}, offset))
                break
        if task.state_seq != state_seq:
            state_seq = task.state_seq
            await response.write(_sse("state", summary(task), offset))
            continue  # look again: output may have come during the write
        if task.status.ended and task.output.closed:
            await response.write(_sse("end", summary(task), offset))
            break
        if bus.closed:
            break
        if await bus.wait(task_topic(task.id), keepalive) is None:
            if not bus.closed:
                await response.write(b": keep-alive\n\n")
        elif not task.status.ended:
            await fanout.tick()  # with the other followers woken by the same output


@contextlib.contextmanager
def _client_may_leave() -> Iterator[None]:
    # A client that goes away while an event is being written ends its stream: no error.
    with contextlib.suppress(ConnectionResetError):
        yield


async def _output_event(messages: Messages[tuple[bytes, int]], task: Task, offset: int) -> tuple[bytes, int]:
    """The `output` event of the bytes from `offset` on (at most CHUNK), and the offset after
    them: made once for all the followers that ask for the same range (its bytes never
    change). From inside a character (a client's offset), the text is longer than the bytes."""
    end = min(task.output.size, offset + CHUNK)

    async def make() -> tuple[tuple[bytes, int], bool]:
        await messages.made.spend(end - offset)
        text, after = await _read_text(task, offset, end - offset)
        return (_sse("output", {"offset": offset, "output": text}, after), after), True

    return await messages.made_once((task.id, offset, end), make)


async def _read_text(task: Task, offset: int, limit: int = CHUNK) -> tuple[str, int]:
    """Output from `offset` (at most `limit` bytes) as text of whole characters, and the
    offset after it."""
    data = complete_chars(await task.output.read(offset, limit))
    return data.decode(errors="replace"), offset + len(data)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Every event as JSON: `task.create` and `task.change` with the task (no output), and
    `task.output` with the output that is new since the last message (a delta)."""
    bus, service = request.app[BUS], request.app[SERVICE]
    cursor = params.int_param(request, "since")
    await params.reach_cursor(request, cursor)
    ws = web.WebSocketResponse(heartbeat=request.app[SETTINGS].keepalive)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "GET /websocket is a WebSocket: send Upgrade: websocket (and its handshake)")
    await ws.prepare(request)
    if cursor is None:
        cursor = bus.seq
    # Output already written when the client connects is not sent again: GET the task.
    offsets = {task.id: task.output.size for task in service.live()}
    reader = asyncio.ensure_future(_drain(ws))
    try:
        with _client_may_leave():
            await _send_all(
                ws, bus, service, cursor, offsets, reader, _guard(request), request.app[SETTINGS].keepalive
            )
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    return ws


async def _send_all(
    ws: web.WebSocketResponse,
    bus: EventBus,
    service: TaskService,
    cursor: int,
    offsets: dict[int, int],
    reader: asyncio.Future[None],
    guard: Guard,
    recheck: float,
) -> None:
    """Send the events after `cursor`, with the output deltas, until the client (`reader`)
    or the bus closes, or the client's credentials are no longer valid."""
    while not ws.closed and not reader.done() and not bus.closed:
        if not await guard():
            await ws.send_json({"event": "unauthorized", **_UNAUTHORIZED})
            break
        seen = bus.published  # what was checked, below, before waiting for news
        try:
            pending = bus.since(cursor)
        except CursorGone as exc:
            await ws.send_json({"event": "reset", "message": str(exc), "seq": bus.seq})
            cursor = bus.seq
            continue
        tasks = await service.find_many({event.task_id for event in pending})
        for event in pending:
            task = tasks.get(event.task_id)
            if task is not None and event.task_id in offsets:
                # A task's output comes before its change, so its end follows its last byte.
                await _send_task_output(ws, task, offsets)
            await ws.send_json(_change(event, tasks))
            cursor = event.seq
            if event.kind.value == "task.create":
                offsets.setdefault(event.task_id, 0)
        sent = await _send_output(ws, service, offsets)
        if not pending and not sent:
            waiting = asyncio.ensure_future(_news(bus, seen))
            try:
                # At the latest after `recheck`: the guard is asked again even without news.
                await asyncio.wait([waiting, reader], timeout=recheck, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()  # also when the handler is cancelled (client gone)


async def _news(bus: EventBus, seen: int) -> None:
    """Wait for an event after `seen`. Run as a task, it starts waiting only once scheduled:
    an event published before then must still end the wait, or it is never sent."""
    if bus.published == seen:
        await bus.wait(all_topic(), 3600)


async def _send_output(ws: web.WebSocketResponse, service: TaskService, offsets: dict[int, int]) -> bool:
    sent = False
    tasks = await service.find_many(offsets)
    for task_id in list(offsets):
        task = tasks.get(task_id)
        if task is None:
            del offsets[task_id]  # pruned
            continue
        sent = await _send_task_output(ws, task, offsets) or sent
        if task.status.ended and task.output.closed and offsets[task_id] >= task.output.size:
            del offsets[task_id]
    return sent


async def _send_task_output(ws: web.WebSocketResponse, task: Task, offsets: dict[int, int]) -> bool:
    """Send the task's output from the client's offset up to what there is now."""
    sent = False
    while (offset := offsets[task.id]) < task.output.size:
        text, offsets[task.id] = await _read_text(task, offset)
        if offsets[task.id] == offset:
            break  # only part of a character so far
        await ws.send_json({"event": "task.output", "taskId": task.id, "offset": offset, "output": text})
        sent = True
    return sent


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so its close and pings are answered."""
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            break
