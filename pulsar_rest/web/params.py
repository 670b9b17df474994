"""Reading the parts of a request: task ids, cursors, timeouts."""

from __future__ import annotations

from aiohttp import web

from pulsar_rest.tasks import Task
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.keys import SERVICE, SETTINGS


def task_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, f"no task with id {raw[:40]!r}")
    return int(raw)


async def task(request: web.Request) -> Task:
    return await request.app[SERVICE].get(task_id(request))


def url(request: web.Request, path: str) -> str:
    """The absolute URL of `path` on this server: under --public-url (behind a proxy), else
    as the client named it (its Host header)."""
    public = request.app[SETTINGS].public_url
    if public:
        return public + path
    try:
        return str(request.url.with_path(path).with_query(None))
    except (ValueError, UnicodeError):  # a port out of range, a name IDNA cannot encode
        raise ApiError(400, f"invalid Host header {request.host[:80]!r}") from None


def int_param(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(400, f"{name} must be a whole number, 0 or more, not {raw[:40]!r}")
    return int(raw)


def timeout(request: web.Request) -> float:
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
