"""Request handlers: parse, call the service, answer JSON in the documented shapes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from pulsar_rest.events import created_topic, task_topic
from pulsar_rest.tasks import Task
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.keys import BUS, SERVICE, SETTINGS

INDEX_HTML = Path(__file__).parent / "static" / "index.html"

# Extra time a kill request waits beyond the grace period for SIGKILL to take effect.
_KILL_SETTLE = 5.0


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_json(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "status": task.status.value,
        "app": task.app,
        "env": task.env,
        "action": task.action,
        "exitCode": task.exit_code,
        "signal": task.signal,
        "output": task.output.text(),
        "pid": task.pid,
        "command": task.command,
        "createdAt": _iso(task.created_at),
        "startedAt": _iso(task.started_at),
        "finishedAt": _iso(task.finished_at),
    }


def _task_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit():
        raise ApiError(404, f"no task with id {raw[:40]!r}")
    return int(raw)


def _url(request: web.Request, path: str) -> str:
    return str(request.url.with_path(path).with_query(None))


def _timeout(request: web.Request) -> float:
    """The long-poll's wait: `timeout` (seconds) if given, never above the configured one."""
    longest = request.app[SETTINGS].long_poll_timeout
    raw = request.query.get("timeout")
    if raw is None:
        return longest
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ApiError(400, f"timeout must be a number of seconds, 0 or more, not {raw[:40]!r}")
    return min(seconds, longest)


def _changed(task: Task | None) -> web.Response:
    if task is None:
        return web.json_response({"changed": False})
    return web.json_response({"changed": True, "task": task_json(task)})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(INDEX_HTML, headers={"Cache-Control": "no-cache"})


async def list_tasks(request: web.Request) -> web.Response:
    tasks = {str(task.id): task_json(task) for task in request.app[SERVICE].tasks()}
    return web.json_response({"url": _url(request, "/"), "tasks": tasks})


async def get_task(request: web.Request) -> web.Response:
    return web.json_response(task_json(request.app[SERVICE].get(_task_id(request))))


async def tasks_created(request: web.Request) -> web.Response:
    """Long-poll: the next task created, or `changed: false` at the timeout."""
    timeout = _timeout(request)
    event = await request.app[BUS].wait(created_topic(), timeout)
    return _changed(None if event is None else request.app[SERVICE].get(event.task_id))


async def task_output(request: web.Request) -> web.Response:
    """Long-poll: the task after its next change (output or status); at once if it has ended."""
    service = request.app[SERVICE]
    task = service.get(_task_id(request))
    timeout = _timeout(request)
    if task.status.ended:
        return _changed(task)
    event = await request.app[BUS].wait(task_topic(task.id), timeout)
    return _changed(None if event is None else task)


async def task_state(request: web.Request) -> web.Response:
    """Long-poll: the task once it has ended; at once if it has."""
    service = request.app[SERVICE]
    task = service.get(_task_id(request))
    ended = await service.wait_ended(task, _timeout(request))
    return _changed(task if ended else None)


async def kill_task(request: web.Request) -> web.Response:
    """Stop a task's whole process tree; answers once it has ended (202 if it has not yet)."""
    service = request.app[SERVICE]
    task = await service.kill(_task_id(request))
    ended = await service.wait_ended(task, request.app[SETTINGS].kill_grace + _KILL_SETTLE)
    return web.json_response(task_json(task), status=200 if ended else 202)


async def create_task(request: web.Request) -> web.Response:
    """POST /:app/:env with the task name as `action` (or `task`) in the body or query."""
    await _refuse_route_clash(request)
    params = await _params(request)
    names = {params[key] for key in ("action", "task") if key in params}
    if not names:
        raise ApiError(400, "missing task name: send it as 'action' (or 'task')")
    if len(names) > 1:
        raise ApiError(400, "'action' and 'task' name different tasks: send one")
    task = await request.app[SERVICE].create(
        request.match_info["app"], request.match_info["env"], names.pop()
    )
    location = _url(request, f"/task/{task.id}")
    return web.json_response(
        {"taskId": task.id, "url": location, "task": task_json(task)},
        headers={"Location": location},
    )


async def _refuse_route_clash(request: web.Request) -> None:
    app = request.match_info["app"]
    reserved = {
        resource.canonical.split("/")[1]
        for resource in request.app.router.resources()
        if resource.canonical.count("/") >= 2 and not resource.canonical.startswith("/{")
    }
    if app in reserved:
        raise ApiError(405, f"method POST is not allowed on {request.path}", {"Allow": "GET"})


async def _params(request: web.Request) -> dict[str, str]:
    """The request's parameters: the body's (JSON or form) over the query string's."""
    params: dict[str, str] = {}
    _merge(params, request.query, "query string")
    if not request.body_exists:
        return params
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.text())
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        _merge(params, body, "JSON body")
    elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        _merge(params, await request.post(), "form body")
    else:
        raise ApiError(415, f"unsupported body type {request.content_type!r}: send JSON or a form")
    return params


def _merge(params: dict[str, str], source: MultiMapping[Any] | dict[str, Any], where: str) -> None:
    for key in ("action", "task"):
        if key in source:
            value = source[key]
            if not isinstance(value, str):
                raise ApiError(400, f"{key!r} in the {where} must be a string")
            params[key] = value
