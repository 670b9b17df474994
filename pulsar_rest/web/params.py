"""Reading the parts of a request: task ids, cursors, timeouts."""

from __future__ import annotations

from aiohttp import web

from pulsar_rest.events import changes_topic, task_topic
from pulsar_rest.tasks import Task
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.keys import BUS, SERVICE, SETTINGS

# With several instances on one store, a client behind a proxy may bring a cursor or an
# offset from another instance that is a moment ahead of this one: it is waited for this
# long (events arrive within milliseconds of their commit, or at the next 1 s tick if a
# notification was missed; output is shipped every 0.1 s) before it is taken as gone (410).
CATCH_UP = 2.0


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


async def reach_cursor(request: web.Request, since: int | None) -> None:
    """Wait, with a shared store, until this instance has the events up to `since`."""
    bus = request.app[BUS]
    if since is not None and request.app[SERVICE].shared:
        await bus.wait_for(changes_topic(), lambda: bus.seq >= since, CATCH_UP)


async def reach_offset(request: web.Request, task: Task, offset: int) -> None:
    """Check that `offset` is within the output, which it may be a moment before the count
    says so: up to the bytes taken in (a byte is in the file, where GET /task/:id/log reads
    it, before the writer's thread counts it), the follower waits for them as for any
    output; with a shared store, another instance's count may be ahead of this one's, and
    it is waited for. Past that, it is gone (410)."""
    output = task.output

    def caught_up() -> bool:
        return offset <= output.taken or task.status.ended

    if not caught_up() and request.app[SERVICE].shared:
        await request.app[BUS].wait_for(task_topic(task.id), caught_up, CATCH_UP)
    if offset > output.taken:
        raise ApiError(
            410, f"offset {offset} is past the end of the output ({output.size} bytes): read it again"
        )
