"""The URL map: the documented API of the original service, then the catch-all create."""

from __future__ import annotations

from aiohttp import web

from pulsar_rest.web import streams, views

TASK = "/task/{id}"


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", views.index)
    app.router.add_get("/status", views.status)
    app.router.add_get("/apps", views.list_apps)
    app.router.add_get("/tasks", views.list_tasks)
    app.router.add_get("/tasks/created", views.tasks_created)
    # Streams have no HEAD: their answer is the body, which HEAD must not send.
    app.router.add_get("/events", streams.events, allow_head=False)
    app.router.add_get("/websocket", streams.websocket, allow_head=False)
    app.router.add_get(TASK, views.get_task)
    app.router.add_get(TASK + "/log", views.get_log)
    app.router.add_get(TASK + "/stdout", views.get_stdout)
    app.router.add_get(TASK + "/stream", streams.task_stream, allow_head=False)
    app.router.add_get(TASK + "/output", views.task_output)
    app.router.add_get(TASK + "/state", views.task_state)
    app.router.add_get(TASK + "/kill", views.kill_task)  # the documented form
    app.router.add_post(TASK + "/kill", views.kill_task)
    # Last: it matches any two-segment path. An app named like the first segment of a
    # route above ("task", "tasks") is refused, so POST /task/12 is no deploy of app "task".
    app.router.add_post("/{app}/{env}", views.create_task)
