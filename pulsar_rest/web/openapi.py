"""GET /openapi.json: the API as an OpenAPI 3.1 document, built once from the data below.

Every route of routes.py is here with its parameters (and the bounds the handlers check),
its bodies, its answers and the error envelope; tests/test_openapi.py walks the app's router
to keep the two equal (a route missing here, or documented but absent, fails it), and runs
schemathesis against a live server from this document. HEAD is documented as its own
operation wherever aiohttp serves it (every GET but the streams and GET /task/:id/kill).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from aiohttp import web

from pulsar_rest import __version__
from pulsar_rest.web.keys import SETTINGS

Json = dict[str, Any]

JSON = "application/json"
TEXT = "text/plain"
MAX_DIGITS = 10**18 - 1  # ids and cursors: 18 digits at most (params.py)
# The GETs aiohttp answers no HEAD for (routes.py: a stream's answer is its body; a link
# checker must not kill).
NO_HEAD = frozenset({"/events", "/websocket", "/task/{id}/stream", "/task/{id}/kill"})


def _schema(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str) -> Json:
    return {"$ref": f"#/components/parameters/{name}"}


def _nullable(kind: str, **more: Any) -> Json:
    return {"type": [kind, "null"], **more}


def _answer(description: str, schema: Json, media: str = JSON, headers: Json | None = None) -> Json:
    answer: Json = {"description": description, "content": {media: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _closed(properties: Json, optional: tuple[str, ...] = ()) -> Json:
    """An object with exactly these properties (all required but `optional`)."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


# --- Schemas ------------------------------------------------------------------------------

_STATUSES = ["queued", "created", "running", "finished", "failed", "killed", "interrupted"]
_COUNT = {"type": "integer", "minimum": 0}
_CURSOR = {"type": "integer", "minimum": 0, "description": "an event cursor (`seq`)"}
_MOMENT = {"type": "string", "format": "date-time"}
_FLAG_TEXT = {
    "type": "string",
    "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$",
    "description": "true or false: `true`, `false`, `1` or `0` (any case)",
}
# Names as names.py checks them: anything else is a 400.
_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"}
_ACTION = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}(\[[A-Za-z0-9_.,:/@=+-]{0,500}\])?$",
    "description": "a Capistrano task, with rake-style arguments `task[a,b]`",
}

# Task variables no task may set (service.py).
_RESERVED = ["PATH", "HOME", "RUBYOPT", "RUBYLIB", "PULSAR_CONF_REPO"]

_SUMMARY: Json = {
    "id": {"type": "integer", "minimum": 1},
    "status": _schema("TaskStatus"),
    "app": {"type": "string"},
    "env": {"type": "string"},
    "action": {"type": "string"},
    "exitCode": _nullable("integer", description="the exit code, when the process exited"),
    "signal": _nullable("string", description="the signal that ended it, when one did"),
    "killSignal": _nullable(
        "string", description="the signal pulsar-rest sent to stop it (SIGTERM, SIGKILL)"
    ),
    "pid": _nullable("integer"),
    "command": {"type": "array", "items": {"type": "string"}, "description": "the argv, secrets as ***"},
    "createdAt": _MOMENT,
    "startedAt": _nullable("string", format="date-time"),
    "finishedAt": _nullable("string", format="date-time"),
    "createdBy": _nullable("string", description="a login, token:NAME, or the client's address"),
    "killedBy": _nullable("string"),
    "confCommit": _nullable("string", description="the configuration repository's commit"),
    "taskVariables": {"type": "array", "items": {"type": "string"}, "description": "names, never values"},
    "outputSize": _COUNT,
    "stdoutSize": _nullable("integer", minimum=0, description="null: stdout not kept apart"),
}
_OUTPUT: Json = {
    "output": {"type": "string", "description": "the last MiB of output at most"},
    "outputOffset": {**_COUNT, "description": "where `output` starts in the log"},
    "outputTruncated": {"type": "boolean", "description": "the log holds more: GET /task/{id}/log"},
}
_TASK_CHANGED = _closed({"changed": {"const": True}, "task": _schema("Task")})
_PAGE = {"type": "integer", "minimum": 1}

SCHEMAS: Json = {
    "TaskStatus": {"type": "string", "enum": _STATUSES},
    "Task": {**_closed({**_SUMMARY, **_OUTPUT}), "description": "the task object"},
    "TaskSummary": {**_closed(_SUMMARY), "description": "the task without its output"},
    "Version": _closed(
        {"pulsar-rest": {"type": "string"}, "python": {"type": "string"}, "aiohttp": {"type": "string"}}
    ),
    "ErrorDetail": _closed(
        {
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "message": {"type": "string"},
            "traceback": _nullable("string", description="only with --debug, for a 500"),
            "taskId": {
                "type": "integer",
                "description": "the task the error is about (a 409's deploy in the way)",
            },
        },
        optional=("taskId",),
    ),
    "Error": {
        **_closed({"ok": {"const": False}, "version": _schema("Version"), "error": _schema("ErrorDetail")}),
        "description": "the one error envelope, whatever the cause",
    },
    "Checks": {
        "type": "object",
        "additionalProperties": _closed({"ok": {"type": "boolean"}, "detail": _nullable("string")}),
        "description": "dataDir, database, accepting, and configRepo for a git repository",
    },
    "Health": _closed({"ok": {"const": True}, "checks": _schema("Checks")}),
    "HealthError": _closed(
        {
            "ok": {"const": False},
            "version": _schema("Version"),
            "error": _schema("ErrorDetail"),
            "checks": _schema("Checks"),
        }
    ),
    "Status": _closed(
        {
            "ok": {"const": True},
            "version": _schema("Version"),
            "tasks": {
                "type": "object",
                "propertyNames": {"enum": _STATUSES},
                "additionalProperties": {"type": "integer", "minimum": 1},
            },
            "waiters": {**_COUNT, "description": "read role only"},
            "seq": {**_CURSOR, "description": "the current event cursor (read role only)"},
        },
        optional=("waiters", "seq"),
    ),
    "TaskList": _closed(
        {
            "url": {"type": "string", "description": "the page"},
            "total": {**_COUNT, "description": "the tasks that match"},
            "page": _PAGE,
            "pageSize": {"type": "integer", "minimum": 1, "maximum": 1000},
            "pages": _COUNT,
            "ids": {"type": "array", "items": {"type": "integer"}, "description": "newest first"},
            "tasks": {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]+$"},
                "additionalProperties": {"anyOf": [_schema("Task"), _schema("TaskSummary")]},
                "description": "by id; without output (TaskSummary) with output=false",
            },
        }
    ),
    "LongPollTimeout": {**_closed({"changed": {"const": False}}), "description": "nothing happened in time"},
    "TaskChanged": {**_TASK_CHANGED, "description": "what the long-poll waited for"},
    "CreatedSince": _closed(
        {
            "changed": {"type": "boolean"},
            "tasks": {"type": "array", "items": _schema("TaskSummary"), "maxItems": 1000},
            "next": {**_CURSOR, "description": "the cursor to send next"},
            "more": {"type": "boolean", "description": "more tasks were created after the last one here"},
            "seq": _CURSOR,
        }
    ),
    "OutputFrom": _closed(
        {
            "changed": {"type": "boolean"},
            "output": {"type": "string"},
            "offset": _COUNT,
            "nextOffset": _COUNT,
            "size": _COUNT,
            "complete": {"type": "boolean", "description": "the task has ended and all of it was read"},
            "task": _schema("TaskSummary"),
            "seq": _CURSOR,
        }
    ),
    "StateSince": _closed(
        {
            "changed": {"type": "boolean"},
            "task": _schema("TaskSummary"),
            "next": {**_CURSOR, "description": "the cursor of the task's last change"},
            "seq": _CURSOR,
        }
    ),
    "CreatedTask": _closed(
        {"taskId": {"type": "integer", "minimum": 1}, "url": {"type": "string"}, "task": _schema("Task")}
    ),
    "CreateTask": {
        "type": "object",
        "properties": {
            "action": _ACTION,
            "task": {**_ACTION, "description": "the same as action"},
            "queue": {
                "anyOf": [{"type": "boolean"}, _FLAG_TEXT],
                "description": "wait for the running deploy",
            },
            "stdout": {"anyOf": [{"type": "boolean"}, _FLAG_TEXT], "description": "keep stdout apart too"},
            "wait": {
                "anyOf": [{"type": "boolean"}, _FLAG_TEXT],
                "description": "answer once the task has ended (or 202 after the long-poll's time)",
            },
            "taskVariables": {
                "type": "object",
                "maxProperties": 100,
                "propertyNames": {
                    "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$",
                    "not": {"anyOf": [{"enum": _RESERVED}, {"pattern": "^(LD_|PULSAR_REST_|BUNDLE_|GEM_)"}]},
                },
                "additionalProperties": {"type": "string", "maxLength": 4096, "pattern": "^[^\\x00]*$"},
                "description": "environment variables of the task: their names are shown, never their values",
            },
        },
        "anyOf": [{"required": ["action"]}, {"required": ["task"]}],
    },
    "CreateTaskForm": {
        "type": "object",
        "properties": {
            "action": _ACTION,
            "task": _ACTION,
            "queue": _FLAG_TEXT,
            "stdout": _FLAG_TEXT,
            "wait": _FLAG_TEXT,
        },
        "anyOf": [{"required": ["action"]}, {"required": ["task"]}],
    },
    "Apps": {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
        "description": "each app with its environments",
    },
    "AuditPage": _closed(
        {
            "entries": {
                "type": "array",
                "items": _closed(
                    {
                        "id": {"type": "integer"},
                        "at": _MOMENT,
                        "action": {
                            "type": "string",
                            "enum": ["sign-in", "sign-out", "denied", "create", "kill"],
                        },
                        "who": _nullable("string"),
                        "remote": _nullable("string"),
                        "taskId": _nullable("integer"),
                        "detail": {"type": "string"},
                    }
                ),
            },
            "total": _COUNT,
            "page": _PAGE,
            "pageSize": {"type": "integer", "minimum": 1, "maximum": 1000},
            "pages": _COUNT,
        }
    ),
    "Me": _closed(
        {
            "login": _nullable("string"),
            "roles": {"type": "array", "items": {"enum": ["read", "write"]}},
            "csrfToken": _nullable("string", description="for POSTs made with the session cookie"),
            "why": _nullable("string", description="why a role is missing"),
            "auth": {"type": "boolean", "description": "authentication is on"},
        },
        optional=("why",),
    ),
    "SignedOut": _closed({"signedOut": {"const": True}}),
    "Processes": _closed(
        {
            "taskId": {"type": "integer"},
            "processes": {
                "type": "array",
                "items": _closed(
                    {
                        "pid": {"type": "integer"},
                        "ppid": {"type": "integer"},
                        "name": {"type": "string"},
                        "cmdline": {"type": "array", "items": {"type": "string"}},
                        "status": {"type": "string"},
                        "cpuPercent": {"type": "number"},
                        "rss": _COUNT,
                        "startedAt": _MOMENT,
                        "environ": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                            "description": "write role only; secrets as ***",
                        },
                    },
                    optional=("environ",),
                ),
            },
        }
    ),
    "Host": _closed(
        {
            "cpu": _closed(
                {
                    "percent": {"type": "number"},
                    "perCore": {"type": "array", "items": {"type": "number"}},
                    "count": {"type": "integer"},
                }
            ),
            "load": _closed({"1m": {"type": "number"}, "5m": {"type": "number"}, "15m": {"type": "number"}}),
            "memory": _closed(
                {"total": _COUNT, "available": _COUNT, "used": _COUNT, "percent": {"type": "number"}}
            ),
            "swap": _closed({"total": _COUNT, "used": _COUNT, "percent": {"type": "number"}}),
            "disk": _closed(
                {
                    "path": {"type": "string"},
                    "total": _COUNT,
                    "used": _COUNT,
                    "free": _COUNT,
                    "percent": {"type": "number"},
                }
            ),
            "uptime": {"type": "integer"},
            "process": _closed(
                {"pid": {"type": "integer"}, "rss": _COUNT, "openFiles": _COUNT, "threads": _COUNT}
            ),
        }
    ),
}

# --- Parameters ---------------------------------------------------------------------------


def _query(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_DIGITS = {"type": "integer", "minimum": 0, "maximum": MAX_DIGITS}

PARAMETERS: Json = {
    "id": {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_DIGITS},
        "description": "the task's id (anything but up to 18 digits is a 404)",
    },
    "timeout": _query(
        "timeout",
        {"type": "number", "minimum": 0},
        "seconds to wait at most; never more than --long-poll-timeout (its default)",
    ),
    "since": _query("since", _DIGITS, "an event cursor (`seq`): answer what came after it (410 when gone)"),
    "offset": _query("offset", _DIGITS, "a byte offset in the task's log (410 past its end)"),
    "limit": _query("limit", {**_DIGITS, "minimum": 1}, "bytes at most (1 MiB at most in any case)"),
    "page": _query(
        "page", {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}, "from 1 (0: the first)"
    ),
    "currentPage": _query(
        "currentPage", {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}, "the same as page"
    ),
    "pageSize": _query(
        "pageSize", {"type": "integer", "minimum": 0, "maximum": 1000}, "50 by default (0: 50)"
    ),
    "Last-Event-ID": {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        "description": "the id of the last event received (browsers send it as they reconnect)",
    },
    "Range": {
        "name": "Range",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "an HTTP byte range (206, or 416 when it cannot be served)",
    },
}

# --- Responses ----------------------------------------------------------------------------

_ERRORS = {
    "400": "bad request: a parameter, body or name the API refuses (and, with authentication on, "
    "a token in the URL)",
    "401": "no credentials, or credentials nobody vouches for (with WWW-Authenticate)",
    "403": "a known identity without the role, or a browser request refused (origin, CSRF)",
    "404": "no such task, app, environment or file (or browser sign-in not configured)",
    "405": "an app named like a route (task, tasks, login)",
    "409": "the task has ended; or the deploy of this app and environment runs (error.taskId)",
    "410": "a cursor or offset from the future or no longer kept: list again",
    "413": "a body over 64 KiB",
    "415": "a body neither JSON nor a form, or in a charset other than UTF-8",
    "503": "not now: shutting down, too many running (--max-running), no configuration repository, "
    "or GitHub cannot say who you are (Retry-After on its rate limit)",
}

RESPONSES: Json = {
    **{f"Error{code}": _answer(text, _schema("Error")) for code, text in _ERRORS.items()},
    "Error": _answer("an error, in the envelope (500: see the server log)", _schema("Error")),
}


def _error(code: str) -> Json:
    return {"$ref": f"#/components/responses/Error{code}"}


# --- Operations ---------------------------------------------------------------------------

_SECURED: list[Json] = [{"bearer": []}, {"basic": []}, {"session": []}]
SECURITY = {"open": [{}, *_SECURED], "read": _SECURED, "write": _SECURED}
_ROLE = {
    "open": "Open to all.",
    "read": "Read role (with authentication on).",
    "write": "Write role (with authentication on).",
}


def _operation(
    operation_id: str,
    summary: str,
    access: str,
    responses: Json,
    *,
    tag: str,
    description: str = "",
    parameters: tuple[str | Json, ...] = (),
    body: Json | None = None,
    errors: tuple[str, ...] = (),
) -> Json:
    """An operation: its access rule shows in `security` and `x-access`; every operation may
    answer 400 (with authentication on, a token in the URL), the protected ones 401, 403 and
    503 (GitHub), and any of them the envelope (`default`: 405 and 500 among others)."""
    codes = {"400", *errors}
    if access != "open":
        codes |= {"401", "403", "503"}
    operation: Json = {
        "operationId": operation_id,
        "summary": summary,
        "description": f"{description} {_ROLE[access]}".strip(),
        "tags": [tag],
        "x-access": access,
        "security": SECURITY[access],
    }
    if parameters:
        operation["parameters"] = [_param(p) if isinstance(p, str) else p for p in parameters]
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = {
        **responses,
        **{code: _error(code) for code in sorted(codes) if code not in responses},
        "default": {"$ref": "#/components/responses/Error"},
    }
    return operation


_TASK_ANSWER = _answer("the task", _schema("Task"))
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the task's URL"}}
_SSE = "text/event-stream"
_LOG_ANSWERS: Json = {
    "200": _answer("the whole output (UTF-8 text, as the task wrote it)", {"type": "string"}, TEXT),
    "206": _answer("the part asked for with Range", {"type": "string"}, TEXT),
    "304": {"description": "not modified (If-None-Match, If-Modified-Since)"},
    "412": {"description": "a precondition failed (If-Match, If-Unmodified-Since)"},
    "416": {"description": "a Range that cannot be served (no body; Content-Range says the size)"},
}


def _poll_answer(cursor_schema: str, description: str) -> Json:
    return _answer(
        description,
        {"oneOf": [_schema("TaskChanged"), _schema("LongPollTimeout"), _schema(cursor_schema)]},
    )


_CREATE_QUERY = (
    _query("action", _ACTION, "the task to run (a body's wins)"),
    _query("task", _ACTION, "the same as action"),
    _query("queue", _FLAG_TEXT, "queue behind the running deploy of this app and environment"),
    _query("stdout", _FLAG_TEXT, "also keep the task's stdout apart (GET /task/{id}/stdout)"),
    _query("wait", _FLAG_TEXT, "answer once the task has ended, or 202 after the long-poll's time"),
    "timeout",
)

PATHS: Json = {
    "/": {
        "get": _operation(
            "page",
            "The page: the tasks, a task's live output, a form to start one, a kill button",
            "open",
            {"200": _answer("the page", {"type": "string"}, "text/html")},
            tag="page",
        )
    },
    "/_static/{path}": {
        "get": _operation(
            "static",
            "The page's files: its ES modules, style sheet, icon and the vendored ansi_up",
            "open",
            {
                "200": _answer(
                    "the file (text/javascript, text/css, image/svg+xml or text/plain)",
                    {"type": "string"},
                    "*/*",
                ),
                "304": {"description": "not modified (If-None-Match, If-Modified-Since)"},
            },
            tag="page",
            parameters=(
                {
                    "name": "path",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "the file, e.g. console.js or vendor/ansi_up.js",
                },
            ),
            errors=("404",),
        )
    },
    "/openapi.json": {
        "get": _operation(
            "openapi",
            "This document",
            "open",
            {"200": _answer("the OpenAPI 3.1 document", {"type": "object"})},
            tag="page",
        )
    },
    "/status": {
        "get": _operation(
            "status",
            "Health and load: task counts by status, waiting clients, the event cursor",
            "open",
            {"200": _answer("waiters and seq for the read role only", _schema("Status"))},
            tag="operations",
        )
    },
    "/health": {
        "get": _operation(
            "health",
            "Fit to serve? For load balancers",
            "open",
            {
                "200": _answer("every check passes", _schema("Health")),
                "503": _answer("unhealthy: the message names the failing checks", _schema("HealthError")),
            },
            tag="operations",
        )
    },
    "/metrics": {
        "get": _operation(
            "metrics",
            "Prometheus metrics",
            "read",
            {"200": _answer("the Prometheus text format", {"type": "string"}, TEXT)},
            tag="operations",
        )
    },
    "/host": {
        "get": _operation(
            "host",
            "The machine: CPU, load, memory, disk, this process",
            "read",
            {"200": _answer("psutil's figures", _schema("Host"))},
            tag="operations",
        )
    },
    "/login": {
        "get": _operation(
            "login",
            "Browser sign-in: off to GitHub",
            "open",
            {
                "302": {
                    "description": "to GitHub's authorisation page, with a single-use state cookie",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                }
            },
            tag="sign-in",
            parameters=(_query("next", {"type": "string"}, "a path of this service to go to after"),),
            errors=("404",),
        )
    },
    "/login/callback": {
        "get": _operation(
            "loginCallback",
            "Browser sign-in: GitHub sends the browser back here",
            "open",
            {
                "302": {
                    "description": "signed in: a new session cookie, to `next`",
                    "headers": {"Location": {"schema": {"type": "string"}}},
                }
            },
            tag="sign-in",
            parameters=(
                _query("code", {"type": "string"}, "GitHub's code"),
                _query("state", {"type": "string"}, "the state /login gave"),
                _query("error", {"type": "string"}, "GitHub's refusal"),
            ),
            errors=("403", "404", "503"),
        )
    },
    "/logout": {
        "post": _operation(
            "logout",
            "End the browser's session",
            "open",
            {"200": _answer("the session cookie is emptied", _schema("SignedOut"))},
            tag="sign-in",
            errors=("403", "404"),
        )
    },
    "/me": {
        "get": _operation(
            "me",
            "Who is signed in: login, roles, the CSRF token of the session",
            "open",
            {"200": _answer("with authentication off: no login, both roles", _schema("Me"))},
            tag="sign-in",
            errors=("401",),
        )
    },
    "/apps": {
        "get": _operation(
            "apps",
            "The apps of the configuration repository and their environments",
            "read",
            {"200": _answer("as pulsar list defines them", _schema("Apps"))},
            tag="tasks",
            description="503 when the configuration repository is not a directory here.",
        )
    },
    "/tasks": {
        "get": _operation(
            "listTasks",
            "The tasks, newest first, a page at a time",
            "read",
            {"200": _answer("a page of tasks", _schema("TaskList"))},
            tag="tasks",
            parameters=(
                "page",
                "currentPage",
                "pageSize",
                _query("status", _schema("TaskStatus"), "only the tasks of this status"),
                _query("app", {"type": "string"}, "only this app's tasks"),
                _query("env", {"type": "string"}, "only this environment's tasks"),
                _query("createdBy", {"type": "string"}, "only the tasks of this creator"),
                _query("output", _FLAG_TEXT, "false: each task without its output"),
            ),
        )
    },
    "/tasks/available": {
        "get": _operation(
            "availableTasks",
            "The tasks the configuration repository describes, as cap -T lists them (suggestions)",
            "read",
            {
                "200": _answer(
                    "the tasks of its recipes that have a description, with their namespaces",
                    {
                        "type": "object",
                        "required": ["tasks"],
                        "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
                    },
                )
            },
            tag="tasks",
            description="Read from the recipes' files, not by running Capistrano: for suggestions "
            "(the console's Task field). 503 when the configuration repository is not a directory here.",
        )
    },
    "/tasks/created": {
        "get": _operation(
            "tasksCreated",
            "Long-poll for the next task created; with since, every task created after it",
            "read",
            {"200": _poll_answer("CreatedSince", "the task created, nothing in time, or (since) the tasks")},
            tag="follow",
            parameters=("timeout", "since"),
            errors=("410",),
        )
    },
    "/events": {
        "get": _operation(
            "events",
            "Server-sent events of every task: task.create, task.change (reset when the cursor is gone)",
            "read",
            {"200": _answer("an endless stream; each id is a cursor", {"type": "string"}, _SSE)},
            tag="follow",
            parameters=("since", "Last-Event-ID"),
        )
    },
    "/websocket": {
        "get": _operation(
            "websocket",
            "The same events as WebSocket JSON messages, with task.output deltas",
            "read",
            {"101": {"description": "switching to the WebSocket protocol"}},
            tag="follow",
            parameters=("since",),
            description="A plain GET, without the WebSocket upgrade, is a 400.",
        )
    },
    "/task/{id}": {
        "parameters": [_param("id")],
        "get": _operation("getTask", "A task", "read", {"200": _TASK_ANSWER}, tag="tasks", errors=("404",)),
    },
    "/task/{id}/log": {
        "parameters": [_param("id")],
        "get": _operation(
            "getLog",
            "The whole output",
            "read",
            _LOG_ANSWERS,
            tag="tasks",
            parameters=("Range",),
            errors=("404",),
        ),
    },
    "/task/{id}/stdout": {
        "parameters": [_param("id")],
        "get": _operation(
            "getStdout",
            "The task's stdout alone (a task created with stdout=true; 404 otherwise)",
            "read",
            _LOG_ANSWERS,
            tag="tasks",
            parameters=("Range",),
            errors=("404",),
        ),
    },
    "/task/{id}/stream": {
        "parameters": [_param("id")],
        "get": _operation(
            "taskStream",
            "Server-sent events of a task: state, output (id: the next byte offset), end (or gone)",
            "read",
            {"200": _answer("the stream, until the task has ended", {"type": "string"}, _SSE)},
            tag="follow",
            parameters=("offset", "Last-Event-ID"),
            errors=("404", "410"),
        ),
    },
    "/task/{id}/output": {
        "parameters": [_param("id")],
        "get": _operation(
            "taskOutput",
            "Long-poll for the task's next change; with offset, its output from that byte",
            "read",
            {
                "200": _poll_answer(
                    "OutputFrom", "the task after its change, nothing in time, or (offset) output"
                )
            },
            tag="follow",
            parameters=("timeout", "offset", "limit"),
            errors=("404", "410"),
        ),
    },
    "/task/{id}/state": {
        "parameters": [_param("id")],
        "get": _operation(
            "taskState",
            "Long-poll for the task's end; with since, for its next status change",
            "read",
            {"200": _poll_answer("StateSince", "the ended task, nothing in time, or (since) the task")},
            tag="follow",
            parameters=("timeout", "since"),
            errors=("404", "410"),
        ),
    },
    "/task/{id}/processes": {
        "parameters": [_param("id")],
        "get": _operation(
            "taskProcesses",
            "A running task's process tree (none once it has ended)",
            "read",
            {"200": _answer("environments for the write role only", _schema("Processes"))},
            tag="operations",
            errors=("404",),
        ),
    },
    "/task/{id}/kill": {
        "parameters": [_param("id")],
        **{
            method: _operation(
                f"killTask{suffix}",
                "Stop the task's whole process tree",
                "write",
                {
                    "200": _answer("the killed task", _schema("Task")),
                    "202": _answer("not ended within --kill-grace plus 5 s", _schema("Task")),
                },
                tag="tasks",
                description=note,
                errors=("404", "409"),
            )
            for method, suffix, note in (
                ("get", "ByGet", "The documented GET, which a browser session may not use."),
                ("post", "", ""),
            )
        },
    },
    "/audit": {
        "get": _operation(
            "audit",
            "The audit trail, newest first: sign-ins, denials, creations, kills",
            "write",
            {"200": _answer("a page of entries", _schema("AuditPage"))},
            tag="operations",
            parameters=("page", "currentPage", "pageSize"),
        )
    },
    "/{app}/{env}": {
        "parameters": [
            {"name": "app", "in": "path", "required": True, "schema": _NAME},
            {"name": "env", "in": "path", "required": True, "schema": _NAME},
        ],
        "post": _operation(
            "createTask",
            "Create and start a task",
            "write",
            {
                "200": _answer(
                    "created (with wait=true: and ended)", _schema("CreatedTask"), headers=_LOCATION
                ),
                "202": _answer(
                    "wait=true, and the task has not ended within the long-poll's time",
                    _schema("CreatedTask"),
                    headers=_LOCATION,
                ),
            },
            tag="tasks",
            description="The task's name as `action` (or `task`), in a JSON body, a form or the query "
            "(the body's win). One deploy at a time per app and environment: another is a 409 "
            "naming it (error.taskId) unless queue=true. A browser session POSTs with X-CSRF-Token.",
            parameters=_CREATE_QUERY,
            body={
                "required": False,
                "content": {
                    JSON: {"schema": _schema("CreateTask")},
                    "application/x-www-form-urlencoded": {"schema": _schema("CreateTaskForm")},
                    "multipart/form-data": {"schema": _schema("CreateTaskForm")},
                },
            },
            errors=("404", "405", "409", "413", "415"),
        ),
    },
}


def _heads(paths: Json) -> None:
    """Add the HEAD operation aiohttp serves beside each GET: the GET's answers, no body."""
    for path, item in paths.items():
        get = item.get("get")
        if get is None or path in NO_HEAD:
            continue
        head = copy.deepcopy(get)
        head["operationId"] += "Head"
        head["summary"] = "HEAD: " + head["summary"]
        head["responses"] = {
            code: {"description": f"the headers of GET's {code}"} for code in get["responses"]
        }
        item["head"] = head


_heads(PATHS)

_DESCRIPTION = """\
Runs pulsar (Capistrano) deployment tasks over HTTP: start one, follow its output live, see \
who ran what, stop it. The README describes every route in full.

**Errors** are one JSON envelope, whatever the cause: `{"ok": false, "version": {...}, \
"error": {"status", "message", "traceback"}}` (and `taskId` where the error is about a task).

**Authentication.** With it off (no grant, no `--auth-provider token`) every route is open and \
credentials are ignored. With it on, each operation's `x-access` says who may use it \
(`open`, `read`, `write`: write implies read); a token goes in `Authorization` (`Bearer TOKEN`, \
`token TOKEN`, or basic `TOKEN:x-oauth-basic`), never in the URL.

**HEAD** is served beside every GET but the streams and `GET /task/{id}/kill`.
"""

DOCUMENT: Json = {
    "openapi": "3.1.0",
    "info": {
        "title": "pulsar-rest",
        "version": __version__,
        "description": _DESCRIPTION,
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "tags": [
        {"name": "tasks", "description": "create, see and kill tasks"},
        {"name": "follow", "description": "long-polls, cursors and streams"},
        {"name": "operations", "description": "health, metrics, the machine, the audit trail"},
        {"name": "sign-in", "description": "browser sign-in with GitHub"},
        {"name": "page", "description": "the page and this document"},
    ],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "parameters": PARAMETERS,
        "responses": RESPONSES,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a pulsar-rest token (prt_...) or a GitHub token; `token TOKEN` works too",
            },
            "basic": {"type": "http", "scheme": "basic", "description": "TOKEN:x-oauth-basic"},
            "session": {
                "type": "apiKey",
                "in": "cookie",
                "name": "pulsar_session",
                "description": "the browser's session (`__Host-pulsar_session` on https), from "
                "/login; a change also sends X-CSRF-Token (from /me) and Origin",
            },
        },
    },
}

_BODIES: dict[str, bytes] = {}


async def document(request: web.Request) -> web.Response:
    """The document, its server the public URL when one is set, else the root of this one."""
    server = request.app[SETTINGS].public_url or "/"
    body = _BODIES.get(server)
    if body is None:
        shown = {"openapi": DOCUMENT["openapi"], "info": DOCUMENT["info"], "servers": [{"url": server}]}
        body = _BODIES[server] = json.dumps({**shown, **DOCUMENT}).encode()
    return web.Response(body=body, content_type=JSON, headers={"Cache-Control": "no-cache"})
