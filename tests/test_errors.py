"""Every error, whatever its cause, is JSON in one envelope; no request makes a 500."""

from __future__ import annotations

import platform
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pulsar_rest import __version__
from pulsar_rest.settings import Settings
from pulsar_rest.web.app import MAX_BODY, create_app
from pulsar_rest.web.auth import Access, Rule
from pulsar_rest.web.keys import RULES
from tests.conftest import Client, ClientFactory, create, finished


def assert_envelope(body: dict[str, Any], status: int) -> None:
    assert set(body) == {"ok", "version", "error"}
    assert body["ok"] is False
    assert body["version"] == {
        "pulsar-rest": __version__,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }
    assert set(body["error"]) == {"status", "message", "traceback"}
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["traceback"] is None


JSON, FORM, MULTIPART = "application/json", "application/x-www-form-urlencoded", "multipart/form-data"
PARTS = f"{MULTIPART}; boundary=xx"
DEFLATED_JSON = {"Content-Type": JSON, "Content-Encoding": "deflate"}  # but not deflated
BAD_PART_HEADER = '--xx\r\nContent-Disposition: form-data; name="action"\r\nno colon\r\n\r\nok\r\n--xx--\r\n'
UNKNOWN_ENCODING = (
    '--xx\r\nContent-Disposition: form-data; name="action"\r\n'
    "Content-Transfer-Encoding: x-uue\r\n\r\nok\r\n--xx--\r\n"
)
BOGUS_PART = (
    '--xx\r\nContent-Disposition: form-data; name="action"\r\n'
    "Content-Type: text/plain; charset=bogus\r\n\r\nok\r\n--xx--\r\n"
)

# (method, path, keyword arguments of the request, expected status, words in the message)
CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("GET", "/no/such/route", {}, 404, "no such resource"),
    ("GET", "/task/abc", {}, 404, "no task with id 'abc'"),
    ("GET", "/task/abc/output", {}, 404, "no task with id 'abc'"),
    ("POST", "/task/abc", {"json": {"action": "ok"}}, 405, "not allowed"),
    ("GET", "/task/4242", {}, 404, "no task with id 4242"),
    ("GET", "/task/4242/output", {}, 404, "no task with id 4242"),
    ("GET", "/task/4242/state", {}, 404, "no task with id 4242"),
    ("POST", "/task/4242/kill", {}, 404, "no task with id 4242"),
    ("PUT", "/tasks", {}, 405, "not allowed"),
    ("DELETE", "/task/1", {}, 405, "not allowed"),
    ("POST", "/task/1", {"json": {"action": "ok"}}, 405, "not allowed"),
    ("POST", "/tasks/created", {"json": {"action": "ok"}}, 405, "not allowed"),
    ("GET", "/shop/prod", {}, 405, "not allowed"),
    ("POST", "/shop/prod", {}, 400, "missing task name"),
    ("POST", "/shop/prod", {"json": {"action": ""}}, 400, "invalid task name"),
    ("POST", "/shop/prod", {"json": {"action": "deploy", "task": "other"}}, 400, "send one"),
    ("POST", "/shop/prod", {"json": {"action": 5}}, 400, "must be a string"),
    ("POST", "/shop/prod", {"json": ["deploy"]}, 400, "must be an object"),
    ("POST", "/shop/prod", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400,
     "invalid JSON"),
    ("POST", "/shop/prod", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400,
     "invalid JSON"),
    ("POST", "/shop/prod", {"data": "deploy", "headers": {"Content-Type": "text/plain"}}, 415,
     "unsupported body"),
    ("POST", "/shop/prod", {"data": {"action": "x" * (MAX_BODY + 1)}}, 413, "body"),
    ("POST", "/shop/prod", {"json": {"action": "-rf"}}, 400, "invalid task name"),
    ("POST", "/shop/prod", {"json": {"action": "deploy;id"}}, 400, "invalid task name"),
    ("POST", "/shop/prod", {"json": {"action": "deploy[$(id)]"}}, 400, "invalid task name"),
    ("POST", "/shop/prod", {"json": {"action": "a b"}}, 400, "invalid task name"),
    ("POST", "/shop/prod", {"json": {"action": "x" * 300}}, 400, "invalid task name"),
    ("POST", "/.hidden/prod", {"json": {"action": "deploy"}}, 400, "invalid app name"),
    ("POST", "/shop/-prod", {"json": {"action": "deploy"}}, 400, "invalid environment name"),
    ("POST", "/sh%20op/prod", {"json": {"action": "deploy"}}, 400, "invalid app name"),
    ("POST", "/shop/pr..od", {"json": {"action": "deploy"}}, 400, "invalid environment name"),
    ("POST", "/sh%2Fop/prod", {"json": {"action": "deploy"}}, 400, "invalid app name"),
    ("GET", "/tasks/created?timeout=x", {}, 400, "timeout"),
    ("POST", "/shop/prod", {"data": '{"action":"ok"}', "headers": {"Content-Type": f"{JSON}; charset=bogus"}},
     415, "unknown encoding: bogus"),
    ("POST", "/shop/prod", {"data": "action=ok", "headers": {"Content-Type": f"{FORM}; charset=bogus"}},
     415, "unknown encoding: bogus"),
    ("POST", "/shop/prod", {"data": BOGUS_PART, "headers": {"Content-Type": PARTS}},
     415, "unknown encoding: bogus"),
    ("POST", "/shop/prod", {"data": b"action=\xff\xfe", "headers": {"Content-Type": FORM}},
     400, "invalid form body"),
    ("POST", "/shop/prod", {"data": "action=ok", "headers": {"Content-Type": f"{FORM}; charset=utf-16"}},
     400, "invalid form body"),
    ("POST", "/shop/prod", {"data": "garbage", "headers": {"Content-Type": MULTIPART}},
     400, "invalid form body"),
    ("POST", "/shop/prod", {"data": "[" * 60000, "headers": {"Content-Type": JSON}},
     400, "nested too deeply"),
    ("GET", "/task/" + "1" * 5000, {}, 404, "no task with id '111"),
    # Found by tests/test_fuzz.py: the Host header names the URLs of the answer.
    ("POST", "/shop/prod", {"json": {"action": "ok"}, "headers": {"Host": "a:99999"}},
     400, "invalid Host header"),
    ("GET", "/tasks", {"headers": {"Host": "[::1]:x"}}, 400, "invalid Host header"),
    ("POST", "/shop/prod", {"data": '{"action":"ok"}', "headers": DEFLATED_JSON},
     400, "the body cannot be read"),
    ("POST", "/shop/prod", {"data": BAD_PART_HEADER, "headers": {"Content-Type": PARTS}},
     400, "the body cannot be read"),
    ("POST", "/shop/prod", {"data": UNKNOWN_ENCODING, "headers": {"Content-Type": PARTS}},
     400, "unknown content transfer encoding"),
    ("POST", "/task/" + "1" * 5000 + "/kill", {}, 404, "no task with id '111"),
    # JSON may escape a lone surrogate; no environment variable can hold it.
    ("POST", "/shop/prod", {"data": '{"action": "ok", "taskVariables": {"A": "\\ud800"}}',
     "headers": {"Content-Type": "application/json"}}, 400, "A is not valid Unicode text"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "words"), CASES)
async def test_error_answers_use_the_envelope(
    client: Client, method: str, path: str, kwargs: dict[str, Any], status: int, words: str
) -> None:
    resp = await client.request(method, path, **kwargs)
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert_envelope(body, status)
    assert words in body["error"]["message"]
    if status == 405:
        assert resp.headers["Allow"]


@pytest.mark.parametrize("path", ["/events", "/task/1/stream", "/websocket"])
async def test_streams_have_no_head(client: Client, path: str) -> None:
    # A stream's answer is its body, which a HEAD answer must not carry.
    resp = await client.head(path)
    assert resp.status == 405 and "HEAD" not in resp.headers["Allow"]


async def test_every_route_answers_errors_in_the_envelope(client: Client) -> None:
    """Walk the route table: each route, with an unknown task id or a wrong method."""
    assert client.app is not None
    seen = 0
    for resource in client.app.router.resources():
        path = resource.canonical.replace("{id}", "9999").replace("{app}", "a").replace("{env}", "b")
        for route in resource:
            if route.method == "HEAD":
                continue  # no body to check
            # A wrong method on the route's path, and the route itself with an unknown id.
            wrong = "PATCH"
            resp = await client.request(wrong, path)
            assert resp.status == 405, path
            assert_envelope(await resp.json(), 405)
            if "9999" in path:
                resp = await client.request(route.method, path)
                assert resp.status == 404, (route.method, path)
                assert_envelope(await resp.json(), 404)
            seen += 1
    assert seen == 28  # every route of the API and the page's files, HEAD aside


async def test_no_tasks_were_created_by_bad_requests(client: Client) -> None:
    for method, path, kwargs, _, _ in CASES:
        # Each on a connection of its own: after a body it cannot read, the server closes it.
        headers = {**kwargs.get("headers", {}), "Connection": "close"}
        await client.request(method, path, **{**kwargs, "headers": headers})
    assert (await (await client.get("/tasks")).json())["tasks"] == {}


async def test_kill_of_finished_task_envelope(client: Client) -> None:
    task = await finished(client, (await create(client, "ok"))["id"])
    resp = await client.get(f"/task/{task['id']}/kill")
    assert_envelope(await resp.json(), 409)


@pytest.mark.parametrize("debug", [False, True])
async def test_unexpected_error_is_a_500_envelope_with_traceback_only_in_debug(
    debug: bool, aiohttp_client: ClientFactory, settings: Settings
) -> None:
    app = create_app(replace(settings, debug=debug))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app[RULES][app.router.add_get("/broken", broken, allow_head=False)] = Rule(Access.OPEN)
    client = await aiohttp_client(app)
    resp = await client.get("/broken")
    assert resp.status == 500
    body = await resp.json()
    assert body["error"]["message"] == "internal error: see the server log"
    if debug:
        assert "RuntimeError: a bug" in body["error"]["traceback"]
    else:
        assert body["error"]["traceback"] is None


async def test_index_page(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "<title>pulsar-rest</title>" in await resp.text()
