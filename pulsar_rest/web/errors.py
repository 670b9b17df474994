"""The one JSON error envelope, produced in one place for every error of every route:
`{"ok": false, "version": {...}, "error": {"status", "message", "traceback"}}`."""

from __future__ import annotations

import logging
import platform
import traceback
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from pulsar_rest import __version__
from pulsar_rest.confrepo import RepoUnavailable, UnknownTarget
from pulsar_rest.names import InvalidName
from pulsar_rest.service import (
    DeployBusy,
    InvalidVariables,
    NoConfigRepo,
    ShuttingDown,
    TaskEnded,
    TaskNotFound,
    TooBusy,
)
from pulsar_rest.web.keys import SETTINGS

log = logging.getLogger(__name__)

VERSION = {
    "pulsar-rest": __version__,
    "python": platform.python_version(),
    "aiohttp": aiohttp.__version__,
}


class ApiError(Exception):
    """An error answer with a status and a message for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# Domain errors and the status each one answers with.
_DOMAIN_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (TaskNotFound, 404),
    (TaskEnded, 409),
    (InvalidName, 400),
    (ShuttingDown, 503),
    (DeployBusy, 409),
    (TooBusy, 503),
    (UnknownTarget, 404),
    (InvalidVariables, 400),
    (NoConfigRepo, 503),
    (RepoUnavailable, 503),
)
# 503s that pass (a stop, a restart, a limit, a repository out of reach) say when to try
# again; one that does not say so (no configuration repository at all) is for good.
_RETRY_AFTER: dict[type[Exception], str] = {ShuttingDown: "5", TooBusy: "5", RepoUnavailable: "10"}


def error_response(
    status: int,
    message: str,
    *,
    trace: str | None = None,
    headers: Mapping[str, str] | None = None,
    task_id: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> web.Response:
    error: dict[str, object] = {"status": status, "message": message, "traceback": trace}
    if task_id is not None:
        error["taskId"] = task_id  # the task the error is about (the deploy in the way)
    body = {"ok": False, "version": VERSION, "error": error, **(extra or {})}
    return web.json_response(body, status=status, headers=headers)


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"no such resource: {request.method} {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    text = exc.text or ""
    # aiohttp's own texts start with "413: ..." or the like; keep the informative part.
    return text.partition(": ")[2] or text or exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _http_message(exc, request), headers=headers)
    except Exception as exc:
        for kind, status in _DOMAIN_ERRORS:
            if isinstance(exc, kind):
                retry = _RETRY_AFTER.get(kind)
                headers = None if retry is None else {"Retry-After": retry}
                return error_response(
                    status, str(exc), task_id=getattr(exc, "task_id", None), headers=headers
                )
        log.exception("error answering %s %s", request.method, request.raw_path)
        trace = traceback.format_exc() if request.app[SETTINGS].debug else None
        return error_response(500, "internal error: see the server log", trace=trace)
