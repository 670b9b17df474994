"""Request handlers: parse, call the service, answer JSON in the documented shapes.

The documented long-polls keep their shapes for old clients. Given a cursor (`since`,
`offset`), the same URLs answer at once with everything after it, or wait for it: a client
that follows with cursors never misses a task, a byte or a state change.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiMapping

from pulsar_rest.audit import AuditAction
from pulsar_rest.auth.grants import Role
from pulsar_rest.events import CursorGone, Event, EventKind, created_topic, state_topic, task_topic
from pulsar_rest.output import ChunkLog, OutputLog, complete_chars
from pulsar_rest.store import TaskFilter
from pulsar_rest.tasks import Task, TaskStatus
from pulsar_rest.web import fanout, params
from pulsar_rest.web.auth import IDENTITY
from pulsar_rest.web.errors import VERSION, ApiError
from pulsar_rest.web.keys import ANSWERS, AUDIT, BUS, OUTPUT_ANSWERS, RESERVED, SERVICE, SETTINGS
from pulsar_rest.web.present import iso, summary

T = TypeVar("T")

# Extra time a kill request waits beyond the grace period for SIGKILL to take effect.
_KILL_SETTLE = 5.0
# Most output bytes in one `offset` answer (Jenkins answers 10,000 lines at most), and most
# tasks in one `since` answer.
OUTPUT_LIMIT = 1024 * 1024
CREATED_LIMIT = 1000


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _gone(exc: CursorGone) -> ApiError:
    return ApiError(410, str(exc))


async def _changed(request: web.Request, task: Task | None) -> web.Response:
    if task is None:
        return _json({"changed": False})
    body = await request.app[ANSWERS].body(task, changed=True)
    return web.Response(body=body, content_type="application/json")


async def status(request: web.Request) -> web.Response:
    """Health and load: for monitors, dashboards and the benchmark. Open to all, it shows
    the rest (waiting clients, the event cursor) only to the read role."""
    service, bus = request.app[SERVICE], request.app[BUS]
    answer: dict[str, Any] = {"ok": True, "version": VERSION, "tasks": service.counts()}
    identity = request.get(IDENTITY)
    if identity is not None and identity.allows(Role.READ):
        answer.update(waiters=bus.waiter_count, seq=bus.seq)
    return _json(answer)


# Tasks in one page of GET /tasks, by default and at most.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE = 1_000_000_000  # an offset a database can hold


async def list_tasks(request: web.Request) -> web.Response:
    """The tasks, newest first, a page at a time (`page` or `currentPage`, `pageSize`),
    filtered by `app`, `env`, `status` and `createdBy`; `total` counts the matching tasks. With
    `output=false`, each without its output (a list that stays small whatever the logs)."""
    query = request.query
    with_output = _flag(query, "output", default=True)
    page, size = _paging(request)
    status = query.get("status")
    if status is not None and status not in {s.value for s in TaskStatus}:
        raise ApiError(
            400, f"unknown status {status[:40]!r}: one of {', '.join(s.value for s in TaskStatus)}"
        )
    where = TaskFilter(query.get("app"), query.get("env"), status, query.get("createdBy"))
    shown, total = await request.app[SERVICE].page(where, (page - 1) * size, size)
    if with_output:
        answers = request.app[ANSWERS]  # each task's answer, cached by its version
        parts = [f'"{task.id}": '.encode() + await answers.body(task, changed=False) for task in shown]
        tasks = b"{" + b", ".join(parts) + b"}"
    else:  # in one dump: a thousand calls of the encoder cost as much again as their work
        tasks = json.dumps({task.id: summary(task) for task in shown}).encode()
    meta = {
        "url": params.url(request, "/"),
        "total": total,
        "page": page,
        "pageSize": size,
        "pages": -(-total // size),
        "ids": [task.id for task in shown],  # newest first (a JSON object's keys may be reordered)
    }
    body = json.dumps(meta)[:-1].encode() + b', "tasks": ' + tasks + b"}"
    return web.Response(body=body, content_type="application/json")


def _paging(request: web.Request) -> tuple[int, int]:
    """The page asked for (from 1) and its size."""
    page = params.int_param(request, "page") or params.int_param(request, "currentPage") or 1
    size = params.int_param(request, "pageSize", PAGE_SIZE) or PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise ApiError(400, f"pageSize must be {MAX_PAGE_SIZE} at most")
    if page > MAX_PAGE:
        raise ApiError(400, f"page must be {MAX_PAGE:,} at most")
    return page, size


async def audit(request: web.Request) -> web.Response:
    """The audit trail, newest first, a page at a time: sign-ins, denials, creates, kills."""
    page, size = _paging(request)
    records, total = await request.app[AUDIT].page((page - 1) * size, size)
    entries = [
        {
            "id": record.id,
            "at": iso(record.at),
            "action": record.action.value,
            "who": record.who,
            "remote": record.remote,
            "taskId": record.task_id,
            "detail": record.detail,
        }
        for record in records
    ]
    return _json(
        {"entries": entries, "total": total, "page": page, "pageSize": size, "pages": -(-total // size)}
    )


async def list_apps(request: web.Request) -> web.Response:
    """The apps and their environments, as `pulsar list` defines them."""
    return _json(await request.app[SERVICE].apps())


async def available_tasks(request: web.Request) -> web.Response:
    """The tasks the configuration repository describes (suggestions: see confrepo)."""
    return _json({"tasks": await request.app[SERVICE].described_tasks()})


async def get_task(request: web.Request) -> web.Response:
    body = await request.app[ANSWERS].body(await params.task(request), changed=False)
    return web.Response(body=body, content_type="application/json")


async def get_log(request: web.Request) -> web.StreamResponse:
    """The whole output as text/plain; HTTP Range reads parts of a large log."""
    task = await params.task(request)
    return await _log_file(request, task, task.output)


async def get_stdout(request: web.Request) -> web.StreamResponse:
    """The task's stdout alone, when it was asked for at its creation (`stdout=true`)."""
    task = await params.task(request)
    if task.stdout is None:
        raise ApiError(404, f"task {task.id} has no stdout of its own: create a task with stdout=true")
    return await _log_file(request, task, task.stdout)


async def _log_file(request: web.Request, task: Task, log: OutputLog) -> web.StreamResponse:
    headers = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"}
    # The size first: the writer's thread makes the file before it counts a byte in it, so a
    # log without a file that counted none has not been written yet, not been pruned.
    size = log.size
    if not log.path.exists():
        if isinstance(log, ChunkLog) and size:
            return await _log_chunks(request, log, headers)  # another instance wrote it
        if size == 0 and await request.app[SERVICE].find(task.id) is not None:
            return web.Response(headers=headers)  # nothing yet: the file comes with the first byte
        raise ApiError(404, f"the output of task {task.id} is gone (pruned from the history)")
    return web.FileResponse(log.path, headers=headers)


# Bytes read from the database at a time for GET /task/:id/log.
_LOG_PIECE = 1024 * 1024


async def _log_chunks(request: web.Request, log: ChunkLog, headers: dict[str, str]) -> web.StreamResponse:
    """A log kept in the shared database, as FileResponse serves a file: whole, or the
    range asked for (206), read a piece at a time."""
    size = log.size
    try:
        wanted = request.http_range
    except ValueError:
        raise ApiError(416, "the Range header must be bytes=START-END, START- or -COUNT") from None
    ranged = hdrs.RANGE in request.headers
    start = 0 if wanted.start is None else max(0, size + wanted.start) if wanted.start < 0 else wanted.start
    stop = size if wanted.stop is None else min(wanted.stop, size)
    if ranged and start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
    response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
    if ranged:
        response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{stop - 1}/{size}"
    response.content_length = stop - start
    await response.prepare(request)
    while start < stop:
        data = await log.read(start, min(_LOG_PIECE, stop - start))
        if not data:
            break
        await response.write(data)
        start += len(data)
    await response.write_eof()
    return response


async def tasks_created(request: web.Request) -> web.Response:
    """Long-poll for the next task created; with `since`, every task created after it."""
    bus, service = request.app[BUS], request.app[SERVICE]
    wait = params.timeout(request)
    since = params.int_param(request, "since")
    if since is None:
        event = await bus.wait(created_topic(), wait)
        return await _changed(request, None if event is None else await service.find(event.task_id))
    await params.reach_cursor(request, since)
    try:
        created, seq = await _creations(request, since)
        if not created and await bus.wait(created_topic(), wait):
            created, seq = await _creations(request, since)
    except CursorGone as exc:
        raise _gone(exc) from None
    more = len(created) > CREATED_LIMIT
    created = created[:CREATED_LIMIT]
    # Without more to come, the cursor is the one they were read at: nothing was created in
    # between (what was created since is after it).
    cursor = created[-1][0].seq if more else seq
    tasks = [summary(task) for _, task in created]
    return _json({"changed": bool(tasks), "tasks": tasks, "next": cursor, "more": more, "seq": seq})


async def _creations(request: web.Request, since: int) -> tuple[list[tuple[Event, Task]], int]:
    """Creation events after `since` of the tasks still there (old ones may be pruned), with
    their tasks; and the cursor they were read at."""
    bus = request.app[BUS]
    seq, events = bus.seq, [e for e in bus.since(since) if e.kind is EventKind.CREATED]
    tasks = await request.app[SERVICE].find_many(e.task_id for e in events)
    return [(e, tasks[e.task_id]) for e in events if e.task_id in tasks], seq


async def task_output(request: web.Request) -> web.Response:
    """Long-poll for the task's next change (at once if it has ended); with `offset`, the
    output from that byte on."""
    task = await params.task(request)
    wait = params.timeout(request)
    offset = params.int_param(request, "offset")
    limit = params.int_param(request, "limit", OUTPUT_LIMIT)
    if not limit:
        raise ApiError(400, "limit must be 1 or more")
    if offset is not None:
        return await _output_from(request, task, offset, min(limit, OUTPUT_LIMIT), wait)
    if task.status.ended:
        return await _changed(request, task)
    event = await request.app[BUS].wait(task_topic(task.id), wait)
    return await _changed(request, None if event is None else task)


def _output_ready(task: Task, offset: int, limit: int) -> bool:
    # While the task runs only whole lines are answered (as Jenkins does), unless a line is
    # longer than an answer can hold.
    return task.status.ended or task.output.size - offset >= limit or task.output.has_newline_after(offset)


async def _output_from(
    request: web.Request, task: Task, offset: int, limit: int, timeout: float
) -> web.Response:
    await params.reach_offset(request, task, offset)
    answers = request.app[OUTPUT_ANSWERS]
    with answers.following(task.id):
        body = await _output_wait(request, task, offset, limit, timeout)
    await answers.sent.spend(len(body))
    return web.Response(body=body, content_type="application/json")


async def _output_wait(request: web.Request, task: Task, offset: int, limit: int, timeout: float) -> bytes:
    """The answer of a long-poll for the output from `offset`, once there is some."""
    bus, answers = request.app[BUS], request.app[OUTPUT_ANSWERS]
    # Answered as soon as there is output, without waiting for the fan-out's tick as a
    # stream does: the followers that waited are woken together by the same output anyway,
    # and a long-poll follower's next ask paces it (with 1,000 of them, the tick's wait made
    # the answers come in bursts: lag p99 280-316 ms against 248-249 without).
    ready = _output_ready(task, offset, limit)
    if not ready:
        ready = await bus.wait_for(task_topic(task.id), lambda: _output_ready(task, offset, limit), timeout)
    # The answer is made once for every follower that asks the same of the task as it is.
    key = (task.id, offset, limit, task.version, bus.seq, ready)

    async def make() -> tuple[bytes, bool]:
        # What is read from the file or escaped for this answer alone (an empty answer, the
        # wait's end, costs nothing; output other answers escaped is a join).
        end = max(offset, min(offset + limit, task.output.size))  # the offset may be ahead of the count
        text = answers.text(task.id, OUTPUT_LIMIT)
        cost = end - offset if offset < task.output.tail_start else text.cost(offset, end)
        if ready and cost:
            await answers.made.spend(cost)
        body = await _output_answer(task, offset, limit, ready, bus.seq, answers, text)
        return body, key[3:5] == (task.version, bus.seq)  # not moved on meanwhile (a read from the file)

    return await answers.made_once(key, make)


async def _output_answer(
    task: Task,
    offset: int,
    limit: int,
    ready: bool,
    seq: int,
    answers: fanout.Messages[bytes],
    text: fanout.JsonText,
) -> bytes:
    data = await task.output.read(offset, limit) if ready else b""
    if not task.status.ended and b"\n" in data:
        data = data[: data.rindex(b"\n") + 1]
    elif offset + len(data) < task.output.size:
        data = complete_chars(data)  # a line longer than an answer: cut between characters
    next_offset = offset + len(data)
    complete = task.status.ended and next_offset >= task.output.size

    def same_for_all() -> bytes:
        rest = {"size": task.output.size, "complete": complete, "task": summary(task), "seq": seq}
        return json.dumps(rest)[1:].encode()

    # As json.dumps would write it all; the output is escaped once for every follower, and
    # what follows its offsets made once for all while the task stays as it is.
    changed = b"true" if data or complete else b"false"
    output = text.escaped(offset, data) if data else b""
    rest = answers.last((task.id, task.version, seq, complete), same_for_all)
    return b'{"changed": %s, "output": "%s", "offset": %d, "nextOffset": %d, %s' % (
        changed,
        output,
        offset,
        next_offset,
        rest,
    )


async def task_state(request: web.Request) -> web.Response:
    """Long-poll for the task's end (at once if it has ended); with `since`, for its next
    status change after that cursor."""
    bus = request.app[BUS]
    task = await params.task(request)
    wait = params.timeout(request)
    since = params.int_param(request, "since")
    if since is None:
        # On the bus, not service.wait_ended: a shutdown answers this wait at once.
        ended = await bus.wait_for(state_topic(task.id), lambda: task.status.ended, wait)
        return await _changed(request, task if ended else None)
    await params.reach_cursor(request, since)
    if since > bus.seq:
        raise ApiError(410, f"cursor {since} is ahead of the server's {bus.seq}: read the task again")
    if task.state_seq <= since:
        await bus.wait(state_topic(task.id), wait)
    changed = task.state_seq > since
    return _json(
        {
            "changed": changed,
            "task": summary(task),
            "next": task.state_seq if changed else since,
            "seq": bus.seq,
        }
    )


async def kill_task(request: web.Request) -> web.Response:
    """Stop a task's whole process tree; answers once it has ended (202 if it has not yet)."""
    service = request.app[SERVICE]
    task = await service.kill(params.task_id(request), by=_who(request))
    request.app[AUDIT].record(AuditAction.KILL, _who(request), request.remote, _what(task), task.id)
    ended = await service.wait_ended(task, request.app[SETTINGS].kill_grace + _KILL_SETTLE)
    body = await request.app[ANSWERS].body(task, changed=False)
    return web.Response(body=body, content_type="application/json", status=200 if ended else 202)


async def create_task(request: web.Request) -> web.Response:
    """POST /:app/:env with the task name as `action` (or `task`) in the body or query.
    With `wait=true`, the answer comes once the task has ended (200), or after the
    long-poll's time with 202 and the task as it is (its Location says where to poll)."""
    _refuse_route_clash(request)
    tasks_url = params.url(request, "/task/")  # a bad Host header is a 400 before any task
    wait = params.timeout(request)  # a bad timeout is a 400 before any task, too
    fields, variables = await _fields(request)
    waits = _flag(fields, "wait")
    names = {fields[key] for key in ("action", "task") if key in fields}
    if not names:
        raise ApiError(400, "missing task name: send it as 'action' (or 'task')")
    if len(names) > 1:
        raise ApiError(400, "'action' and 'task' name different tasks: send one")
    task = await request.app[SERVICE].create(
        request.match_info["app"],
        request.match_info["env"],
        names.pop(),
        by=_who(request),
        queue=_flag(fields, "queue"),
        variables=variables,
        stdout=_flag(fields, "stdout"),
    )
    request.app[AUDIT].record(AuditAction.CREATE, _who(request), request.remote, _what(task), task.id)
    location = f"{tasks_url}{task.id}"
    # The task goes on whatever becomes of this wait (a client gone, the time up).
    ended = not waits or await request.app[SERVICE].wait_ended(task, wait)
    data = await request.app[ANSWERS].body(task, changed=False)
    body = b'{"taskId": %d, "url": %s, "task": %s}' % (task.id, json.dumps(location).encode(), data)
    return web.Response(
        body=body,
        content_type="application/json",
        headers={"Location": location},
        status=200 if ended else 202,
    )


def _who(request: web.Request) -> str:
    """Who is asking: the identity (the client's address without authentication)."""
    return request[IDENTITY].name


def _what(task: Task) -> str:
    return f"{task.app}/{task.env} {task.action}"


def _refuse_route_clash(request: web.Request) -> None:
    # POST /task/12 would otherwise start a task of app "task": an app named like the first
    # segment of another route answers 405, as the path would without the catch-all.
    app = request.match_info["app"]
    if app in request.app[RESERVED]:
        raise ApiError(405, f"method POST is not allowed on {request.path}", {"Allow": "GET"})


async def _fields(request: web.Request) -> tuple[dict[str, str], dict[str, str]]:
    """The request's parameters (the body's, JSON or form, over the query string's), and
    its task variables (a JSON body's `taskVariables` object)."""
    fields: dict[str, str] = {}
    variables: dict[str, str] = {}
    _merge(fields, request.query, "query string")
    if not request.body_exists:
        return fields, variables
    try:
        if request.content_type == "application/json":
            try:
                body = json.loads(await _read(request.text()))
            except RecursionError:
                raise ApiError(400, "invalid JSON body: nested too deeply") from None
            except ValueError as exc:  # UnicodeDecodeError too
                raise ApiError(400, f"invalid JSON body: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object")
            _merge(fields, body, "JSON body")
            variables = body.get("taskVariables", {})  # checked by the service
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            try:
                form = await _read(request.post())
            except ValueError as exc:  # undecodable text, a multipart body without boundary
                raise ApiError(400, f"invalid form body: {exc}") from None
            except RuntimeError as exc:  # a multipart part in an unknown transfer encoding
                raise ApiError(400, f"invalid form body: {exc}") from None
            _merge(fields, form, "form body")
        else:
            raise ApiError(415, f"unsupported body type {request.content_type!r}: send JSON or a form")
    except LookupError as exc:  # Content-Type: ...; charset=bogus (of the body or of a part)
        raise ApiError(415, f"{exc}: send UTF-8") from None
    return fields, variables


def _flag(fields: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = fields.get(name, str(default)).lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false, not {value[:40]!r}")
    return value in ("true", "1")


async def _read(body: Awaitable[T]) -> T:
    """The body as read by aiohttp; what cannot be read (an undecodable Content-Encoding, a
    malformed multipart part header) is the client's error."""
    try:
        return await body
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        detail = getattr(exc, "message", None) or str(exc)
        raise ApiError(400, f"the body cannot be read: {detail}") from None


def _merge(fields: dict[str, str], source: MultiMapping[Any] | dict[str, Any], where: str) -> None:
    for key in ("action", "task", "queue", "stdout", "wait"):
        if key in source:
            value = source[key]
            if key in ("queue", "stdout", "wait") and isinstance(value, bool):
                value = str(value).lower()  # JSON true/false
            if not isinstance(value, str):
                raise ApiError(400, f"{key!r} in the {where} must be a string")
            fields[key] = value
