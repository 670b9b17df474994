"""Operators' routes and the HTTP metrics: /health, /metrics, /host, /task/:id/processes,
and the middleware that counts every request by its route template."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from pulsar_rest import health as health_checks
from pulsar_rest import host as host_statistics
from pulsar_rest.auth.grants import Role
from pulsar_rest.web import params
from pulsar_rest.web.auth import IDENTITY
from pulsar_rest.web.errors import error_response
from pulsar_rest.web.keys import CONF, METRICS, SERVICE, SETTINGS, STORE
from pulsar_rest.web.present import iso


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    # The route's template (/task/{id}), never the raw path: the label set stays bounded.
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    counted = metrics.route(route, request.method)
    counted.in_progress.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects pass the error middleware as exceptions
        status = exc.status
        raise
    finally:
        counted.in_progress.dec()
        counted.answered(status, time.perf_counter() - started)


async def health(request: web.Request) -> web.Response:
    """200 when this instance is fit to serve, else 503 naming what is not (open to all)."""
    app = request.app
    found = await health_checks.checks(app[SETTINGS].data_dir, app[STORE], app[SERVICE], app[CONF])
    shown = {name: {"ok": check.ok, "detail": check.detail or None} for name, check in found.items()}
    failing = [name for name, check in found.items() if not check.ok]
    if failing:
        message = "unhealthy: " + ", ".join(f"{name} ({found[name].detail})" for name in failing)
        return error_response(503, message, extra={"checks": shown})
    return web.json_response({"ok": True, "checks": shown})


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[METRICS].render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def host(request: web.Request) -> web.Response:
    data = await asyncio.to_thread(host_statistics.statistics, request.app[SETTINGS].data_dir)
    return web.json_response(data)


async def processes(request: web.Request) -> web.Response:
    """A running task's process tree; each process's environment only for the write role,
    its secrets replaced by ***."""
    task_id = params.task_id(request)
    with_environment = request[IDENTITY].allows(Role.WRITE)
    found = await request.app[SERVICE].processes(task_id, environment=with_environment)
    listed: list[dict[str, Any]] = []
    for proc in found:
        shown: dict[str, Any] = {
            "pid": proc.pid,
            "ppid": proc.ppid,
            "name": proc.name,
            "cmdline": proc.cmdline,
            "status": proc.status,
            "cpuPercent": proc.cpu_percent,
            "rss": proc.rss,
            "startedAt": iso(datetime.fromtimestamp(proc.started, UTC)),
        }
        if with_environment:
            shown["environ"] = proc.environ
        listed.append(shown)
    return web.json_response({"taskId": task_id, "processes": listed})
