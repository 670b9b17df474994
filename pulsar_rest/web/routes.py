"""The URL map, each route with who may use it: one table, and nothing outside it (the
middleware in auth.py refuses a route that has no rule)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from pulsar_rest.web import console, monitoring, openapi, signin, streams, views
from pulsar_rest.web.auth import Access, Rule
from pulsar_rest.web.keys import RESERVED, RULES

TASK = "/task/{id}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    rule: Rule
    # Also HEAD for a GET: not for streams (their answer is the body, which HEAD must not
    # send), nor for a GET that changes something.
    head: bool = True


_OPEN = Rule(Access.OPEN)
_READ = Rule(Access.READ)
_CHANGE = Rule(Access.WRITE, changes=True)

ROUTES: tuple[Route, ...] = (
    # Open: the page (which then asks to sign in), signing in and out, and health.
    Route("GET", "/", console.index, _OPEN),
    Route("GET", "/_static/{path:.+}", console.static_file, _OPEN),  # the page's scripts, style, icon
    Route("GET", "/status", views.status, _OPEN),  # counts only, without the read role
    Route("GET", "/health", monitoring.health, _OPEN),  # for load balancers
    Route("GET", "/openapi.json", openapi.document, _OPEN),
    Route("GET", "/login", signin.login, _OPEN),
    Route("GET", "/login/callback", signin.callback, _OPEN),
    Route("POST", "/logout", signin.logout, _OPEN),
    Route("GET", "/me", signin.me, Rule(Access.OPEN, identify=True)),  # 401 when nobody is signed in
    # Read: everything that shows tasks.
    Route("GET", "/apps", views.list_apps, _READ),
    Route("GET", "/tasks", views.list_tasks, _READ),
    Route("GET", "/tasks/created", views.tasks_created, _READ),
    Route("GET", "/tasks/available", views.available_tasks, _READ),
    Route("GET", "/events", streams.events, _READ, head=False),
    Route("GET", "/websocket", streams.websocket, _READ, head=False),
    Route("GET", TASK, views.get_task, _READ),
    Route("GET", TASK + "/log", views.get_log, _READ),
    Route("GET", TASK + "/stdout", views.get_stdout, _READ),
    Route("GET", TASK + "/stream", streams.task_stream, _READ, head=False),
    Route("GET", TASK + "/output", views.task_output, _READ),
    Route("GET", TASK + "/state", views.task_state, _READ),
    Route("GET", TASK + "/processes", monitoring.processes, _READ),  # environments: write only
    Route("GET", "/metrics", monitoring.metrics, _READ),
    Route("GET", "/host", monitoring.host, _READ),
    # Write: what changes tasks, and who did what.
    # The documented form (never by cookie), without HEAD: a link checker must not kill.
    Route("GET", TASK + "/kill", views.kill_task, _CHANGE, head=False),
    Route("POST", TASK + "/kill", views.kill_task, _CHANGE),
    Route("GET", "/audit", views.audit, Rule(Access.WRITE)),
    # Last: it matches any two-segment path. An app named like the first segment of a
    # route above ("task", "tasks") is refused, so POST /task/12 is no deploy of app "task".
    Route("POST", "/{app}/{env}", views.create_task, _CHANGE),
)


def setup_routes(app: web.Application) -> None:
    rules = {}
    for route in ROUTES:
        rules[app.router.add_route(route.method, route.path, route.handler)] = route.rule
        if route.method == "GET" and route.head:
            rules[app.router.add_route("HEAD", route.path, route.handler)] = route.rule
    app[RULES] = rules
    app[RESERVED] = frozenset(
        route.path.split("/")[1]
        for route in ROUTES
        if route.path.count("/") >= 2 and not route.path.startswith("/{")
    )
