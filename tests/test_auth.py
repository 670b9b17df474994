"""Authentication and roles: GitHub tokens, pulsar-rest tokens, the route table, denials."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pulsar_rest.auth.grants import Role, parse_grants
from pulsar_rest.auth.tokens import digest
from pulsar_rest.settings import Settings
from pulsar_rest.store import TokenAdmin
from pulsar_rest.tasks import utcnow
from pulsar_rest.web.app import create_app
from pulsar_rest.web.auth import Access
from pulsar_rest.web.keys import RULES, SETTINGS
from pulsar_rest.web.routes import ROUTES
from tests.conftest import Client, ClientFactory, eventually
from tests.fake_github import FakeGitHub, MakeGitHub

ALICE, BOB, CAROL = "gh-alice-token", "gh-bob-token", "gh-carol-token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def acme(github: FakeGitHub) -> FakeGitHub:
    """alice deploys (team acme/deployers), bob reads (a member of acme), carol is nobody."""
    github.add_user("alice", ALICE)
    github.add_user("bob", BOB)
    github.add_user("carol", CAROL)
    github.add_member("acme", "bob")
    github.add_team("acme", "deployers", ["alice"])
    return github


@pytest.fixture
def auth_settings(settings: Settings, acme: FakeGitHub) -> Settings:
    return replace(
        settings,
        auth_write=parse_grants("team:acme/deployers", "user"),
        auth_read=parse_grants("acme", "org"),
        github_url=acme.url,
        github_api_url=acme.api_url,
    )


@pytest.fixture
async def authed(make_client: ClientFactory, auth_settings: Settings) -> Client:
    fields = ("auth_write", "auth_read", "github_url", "github_api_url")
    return await make_client(**{name: getattr(auth_settings, name) for name in fields})


async def error(resp: Any) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert body["ok"] is False
    found: dict[str, Any] = body["error"]
    return found


async def test_roles_from_github(authed: Client, acme: FakeGitHub) -> None:
    resp = await authed.get("/tasks")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await error(resp))["status"] == 401
    resp = await authed.get("/tasks", headers=bearer(BOB))
    assert resp.status == 200, await resp.text()
    resp = await authed.post("/shop/prod", json={"action": "ok"}, headers=bearer(BOB))
    assert resp.status == 403
    message = (await error(resp))["message"]
    assert "bob has no write role" in message and "bob is not a member of acme/deployers" in message, message
    resp = await authed.get("/tasks", headers=bearer(CAROL))
    assert resp.status == 403
    assert "carol is not a member of acme" in (await error(resp))["message"]
    resp = await authed.post("/shop/prod", json={"action": "ok"}, headers=bearer(ALICE))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["task"]["createdBy"] == "alice"
    basic = base64.b64encode(f"{ALICE}:x-oauth-basic".encode()).decode()
    resp = await authed.get("/tasks", headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 200
    resp = await authed.get("/tasks", headers={"Authorization": f"token {ALICE}"})
    assert resp.status == 200
    # One question per token per --auth-cache-ttl.
    assert acme.count("/user") >= 3


# -- helpers ---------------------------------------------------------------------------------

# A deadline for what a stream should send soon: a failure, never a pace.
READ_DEADLINE = 5.0
# The short TTL of the expiry tests: long enough for a request, short enough for a fast file.
SHORT_TTL = 0.3


def basic(user: str, password: str = "x-oauth-basic") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def user_calls(github: FakeGitHub, token: str | None = None) -> int:
    """GET /user requests (exactly that path, not /user/teams), of `token` if given."""
    return sum(
        1
        for r in github.requests
        if r.path.endswith("/user") and (token is None or r.authorization == f"token {token}")
    )


async def github_client(make_client: ClientFactory, github: FakeGitHub, **overrides: Any) -> Client:
    """A client of an app that asks `github`, with acme's grants unless overridden."""
    fields: dict[str, Any] = {
        "auth_write": parse_grants("team:acme/deployers", "user"),
        "auth_read": parse_grants("acme", "org"),
        "github_url": github.url,
        "github_api_url": github.api_url,
    }
    return await make_client(**{**fields, **overrides})


async def status_of(client: Client, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> int:
    resp = await client.request(method, path, headers=headers, **kwargs)
    resp.release()
    return resp.status


async def eventually_status(
    client: Client, path: str, headers: dict[str, str], expected: int, timeout: float = 5.0
) -> None:
    """`eventually` for a condition that needs a request: GET `path` (every 20 ms, a poll's
    pace, not a guess of when) until it answers `expected`, failing after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (status := await status_of(client, "GET", path, headers)) != expected:
        assert loop.time() < deadline, f"GET {path} still answers {status}, not {expected}"
        await asyncio.sleep(0.02)


@pytest.fixture
def admin(settings: Settings) -> Iterator[TokenAdmin]:
    """`pulsar-rest token`'s side of the store, on the data dir every app of a test uses."""
    tokens = TokenAdmin(settings.data_dir)
    yield tokens
    tokens.close()


async def next_event(resp: aiohttp.ClientResponse) -> tuple[str, Any] | None:
    """The next SSE event as (name, data), keep-alive comments skipped; None once the
    server has ended the stream."""
    name, data = "", list[str]()
    async with asyncio.timeout(READ_DEADLINE):
        while True:
            raw = await resp.content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                continue
            if not line:
                if name:
                    return name, json.loads("\n".join(data)) if data else None
                continue
            key, _, value = line.partition(":")
            if key == "event":
                name = value.removeprefix(" ")
            elif key == "data":
                data.append(value.removeprefix(" "))


async def ends_unauthorized(resp: aiohttp.ClientResponse) -> list[str]:
    """Read the stream to its `unauthorized` event, check that the server then ends it;
    the names of the events before it."""
    names: list[str] = []
    while (event := await next_event(resp)) is not None and event[0] != "unauthorized":
        names.append(event[0])
    assert event is not None, f"the stream ended without `unauthorized` after {names}"
    assert "no longer valid" in event[1]["message"]
    assert await next_event(resp) is None, "the stream goes on after `unauthorized`"
    return names


# -- 1. every route, every kind of caller ------------------------------------------------------

CALLERS = ("nobody", "bad-token", "bob", "read-token", "alice", "write-token")
READERS = {"bob", "read-token"}
WRITERS = {"alice", "write-token"}


def concrete(path: str) -> str:
    return path.replace("{id}", "9999").replace("{app}", "shop").replace("{env}", "prod")


@pytest.mark.parametrize("caller", CALLERS)
async def test_route_matrix(authed: Client, admin: TokenAdmin, caller: str) -> None:
    """Every route of the router has a rule, and the rule is what each caller meets."""
    headers = {
        "nobody": {},
        "bad-token": bearer("gh-nobody-knows-this"),
        "bob": bearer(BOB),
        "read-token": bearer(admin.create("reader", Role.READ, None)),
        "alice": bearer(ALICE),
        "write-token": bearer(admin.create("writer", Role.WRITE, None)),
    }[caller]
    assert authed.app is not None
    rules = authed.app[RULES]
    routes = list(authed.app.router.routes())
    assert len(routes) >= len(ROUTES)
    for route in routes:
        assert route in rules, f"{route.method} {route.resource} has no rule"
    checked = 0
    for route in routes:
        if route.method == "HEAD":
            continue
        assert route.resource is not None
        path = concrete(route.resource.canonical)
        rule = rules[route]
        what = f"{caller}: {route.method} {path} ({rule.access.value})"
        body = {"action": "ok"} if path == "/shop/prod" else None
        resp = await authed.request(route.method, path, headers=headers, json=body, params={"timeout": "0"})
        if path == "/events" and resp.status == 200:
            assert resp.headers["Content-Type"].startswith("text/event-stream"), what
            resp.close()  # the headers say it all; the stream would go on
        else:
            await resp.read()
        anonymous = caller in ("nobody", "bad-token")
        if rule.access is Access.OPEN:
            if path == "/me" and anonymous:
                # The handler's own answer (documented in routes.py), not the gatekeeper's.
                assert resp.status == 401, what
                assert (await error(resp))["message"] == "not signed in", what
            else:
                assert resp.status not in (401, 403), what
        elif anonymous:
            assert resp.status == 401, what
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), what
        elif rule.access is Access.READ or caller in WRITERS:
            assert resp.status not in (401, 403), f"{what}: {resp.status} {await resp.text()}"
        else:
            assert rule.access is Access.WRITE and caller in READERS
            assert resp.status == 403, what
            assert "has no write role" in (await error(resp))["message"], what
        checked += 1
    assert checked == len(ROUTES)


async def test_route_without_rule_is_refused_to_everybody(
    aiohttp_client: ClientFactory, auth_settings: Settings, admin: TokenAdmin
) -> None:
    """Deny by default: a route someone adds to the router but not to ROUTES is a 403."""
    reached: list[str] = []

    async def extra(request: web.Request) -> web.Response:
        reached.append(request.method)
        return web.json_response({"secret": True})

    app = create_app(auth_settings)
    app.router.add_get("/extra", extra)
    app.router.add_post("/extra/{thing}/x", extra)
    client = await aiohttp_client(app)
    writer = admin.create("writer", Role.WRITE, None)
    for headers in ({}, bearer("gh-bad"), bearer(BOB), bearer(ALICE), bearer(writer)):
        for method, path in (("GET", "/extra"), ("POST", "/extra/a/x")):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 403, (method, path, headers)
            assert (await error(resp))["message"] == "this route has no access rule"
    assert reached == []


# -- 2. credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (bearer(ALICE), 200),
        ({"Authorization": f"token {ALICE}"}, 200),
        ({"Authorization": f"bearer  {ALICE} "}, 200),
        (basic(ALICE), 200),
        (basic(ALICE, "hunter2"), 401),
        (basic("", "x-oauth-basic"), 401),
        ({"Authorization": "Basic %%%not-base64"}, 401),
        ({"Authorization": f"Digest {ALICE}"}, 401),
        ({"Authorization": ALICE}, 401),
        ({"Authorization": "Bearer "}, 401),
    ],
    ids=[
        "bearer",
        "token",
        "bearer-lower-spaces",
        "basic-x-oauth-basic",
        "basic-other-password",
        "basic-no-user",
        "basic-garbage",
        "unknown-scheme",
        "no-scheme",
        "empty-bearer",
    ],
)
async def test_credential_forms(authed: Client, headers: dict[str, str], expected: int) -> None:
    resp = await authed.get("/audit", headers=headers)
    assert resp.status == expected, await resp.text()
    if expected == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await error(resp))["status"] == 401


@pytest.mark.parametrize(
    "header",
    ["Basic " + base64.b64encode(b"proxy-user:proxy-pass").decode(), "Digest username=x", "Negotiate abc"],
    ids=["proxy-basic", "digest", "negotiate"],
)
async def test_open_routes_ignore_a_header_they_cannot_read(authed: Client, header: str) -> None:
    """An open route is open to anyone (an unknown token is ignored there): so is a header
    of another scheme, as a browser behind a basic-auth proxy sends to every page."""
    for path in ("/", "/status"):
        assert await status_of(authed, "GET", path, {"Authorization": header}) == 200, path


async def test_token_in_url_is_refused_and_never_used(authed: Client, acme: FakeGitHub) -> None:
    """`?access_token=` is a 400 wherever it comes, even with good credentials beside it."""
    for path, headers in (("/tasks", {}), ("/status", {}), ("/tasks", bearer(BOB))):
        resp = await authed.get(path, params={"access_token": ALICE}, headers=headers)
        assert resp.status == 400
        assert "never taken from the URL" in (await error(resp))["message"]
    resp = await authed.post("/shop/prod", params={"access_token": ALICE}, json={"action": "ok"})
    assert resp.status == 400
    assert acme.requests == []  # not even looked at: GitHub was never asked about it


async def test_our_tokens(authed: Client, admin: TokenAdmin, acme: FakeGitHub) -> None:
    """prt_ tokens: their role, their expiry, and revocation at the very next request."""
    reader = admin.create("reader", Role.READ, None)
    writer = admin.create("writer", Role.WRITE, utcnow() + timedelta(hours=1))
    expired = admin.create("old", Role.WRITE, utcnow() - timedelta(seconds=1))
    assert await status_of(authed, "GET", "/tasks", bearer(reader)) == 200
    assert await status_of(authed, "GET", "/audit", bearer(reader)) == 403
    assert await status_of(authed, "GET", "/audit", basic(writer)) == 200
    assert await status_of(authed, "GET", "/audit", {"Authorization": f"token {writer}"}) == 200
    resp = await authed.get("/tasks", headers=bearer(expired))
    assert resp.status == 401
    assert "the token old has expired" in (await error(resp))["message"]
    resp = await authed.get("/tasks", headers=bearer("prt_" + "x" * 43))
    assert resp.status == 401
    assert admin.revoke("writer")
    resp = await authed.get("/audit", headers=bearer(writer))
    assert resp.status == 401, "a revoked token is refused at its very next request"
    assert "unknown or revoked" in (await error(resp))["message"]
    assert acme.requests == []  # our tokens are never GitHub's business


# -- 3. --auth-provider token -------------------------------------------------------------------


async def test_auth_provider_token(make_client: ClientFactory, github: FakeGitHub, admin: TokenAdmin) -> None:
    """--auth-provider token: only our tokens; GitHub is never asked, even where it is set."""
    github.add_user("alice", ALICE)
    client = await make_client(auth_provider="token", github_url=github.url, github_api_url=github.api_url)
    resp = await client.get("/tasks", headers=bearer(ALICE))
    assert resp.status == 401
    assert "pulsar-rest token create" in (await error(resp))["message"]
    assert await status_of(client, "GET", "/tasks", {}) == 401
    writer = admin.create("ci", Role.WRITE, None)
    resp = await client.post("/shop/prod", json={"action": "ok"}, headers=bearer(writer))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["task"]["createdBy"] == "token:ci"
    reader = admin.create("viewer", Role.READ, None)
    assert await status_of(client, "GET", "/tasks", bearer(reader)) == 200
    assert await status_of(client, "GET", "/audit", bearer(reader)) == 403
    assert github.requests == []


# -- 4. GitHub failing ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error500", "ratelimit"])
async def test_github_failure_is_503_asked_once_and_not_kept(
    authed: Client, acme: FakeGitHub, mode: str
) -> None:
    acme.mode = mode
    resp = await authed.get("/tasks", headers=bearer(BOB))
    assert resp.status == 503
    found = await error(resp)
    assert found["status"] == 503 and "try again later" in found["message"]
    if mode == "ratelimit":
        assert "rate limit" in found["message"]
        retry = resp.headers["Retry-After"]
        assert retry.isdigit() and 1 <= int(retry) <= 60
    else:
        assert "GitHub answered 500" in found["message"]
        assert resp.headers["Retry-After"] == "10"  # it passes: clients may try again then
    assert len(acme.requests) == 1, "one question, no retry loop"
    # An open route still answers, with no more than it shows anybody.
    resp = await authed.get("/status", headers=bearer(BOB))
    assert resp.status == 200 and "seq" not in await resp.json()
    acme.mode = "ok"
    assert await status_of(authed, "GET", "/tasks", bearer(BOB)) == 200, "a failure is not cached"


async def test_github_hanging_is_503_within_the_timeout(
    make_client: ClientFactory, acme: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pulsar_rest.auth.github.TIMEOUT", 0.3)
    client = await github_client(make_client, acme)
    acme.mode = "hang"
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        resp = await client.get("/tasks", headers=bearer(BOB))
        took = loop.time() - started
        assert resp.status == 503
        assert "did not answer within 0.3s" in (await error(resp))["message"]
        assert 0.3 <= took < 3.0, took
        assert acme.hanging == 1
    finally:
        acme.release_hang()
    assert await status_of(client, "GET", "/tasks", bearer(BOB)) == 200, "a failure is not cached"


# -- 5. memberships --------------------------------------------------------------------------------


async def test_pending_member_is_refused(authed: Client, acme: FakeGitHub) -> None:
    acme.add_user("dave", "gh-dave-token")
    acme.add_member("acme", "dave", state="pending")
    resp = await authed.get("/tasks", headers=bearer("gh-dave-token"))
    assert resp.status == 403
    message = (await error(resp))["message"]
    assert "dave's membership of acme is pending" in message, message


async def test_team_found_on_a_later_page(make_client: ClientFactory, acme: FakeGitHub) -> None:
    """alice is in 251 teams (250 + deployers): the granted one is on page 3 of 3."""
    acme.add_teams("alice", "acme", 250)
    client = await github_client(make_client, acme, auth_write=parse_grants("team:acme/team-0240", "user"))
    resp = await client.get("/me", headers=bearer(ALICE))
    assert resp.status == 200
    assert (await resp.json())["roles"] == ["read", "write"]
    assert acme.count("/user/teams") == 3
    pages = [r.query.get("page", "1") for r in acme.requests if r.path == "/user/teams"]
    assert pages == ["1", "2", "3"]


@pytest.mark.parametrize(
    "grant",
    ["org:acme", "team:acme/deployers"],
)
async def test_saml_org_is_explained(make_client: ClientFactory, acme: FakeGitHub, grant: str) -> None:
    """alice is in acme and its team, but her token is not authorised for acme's SAML SSO:
    the 403 must say so (the fix is on GitHub), not that she is no member."""
    acme.saml_orgs.add("acme")
    client = await github_client(make_client, acme, auth_write=parse_grants(grant, "user"), auth_read=())
    resp = await client.get("/tasks", headers=bearer(ALICE))
    assert resp.status == 403
    message = (await error(resp))["message"]
    assert "SAML" in message, message


async def test_token_without_read_org_goes_through_the_service_account(
    make_client: ClientFactory, acme: FakeGitHub
) -> None:
    """GitHub refuses a token without read:org: the service account asks for it, for an org
    grant (bob reads) and a team grant (alice writes); without one, the 403 says why."""
    acme.add_user("alice", "gh-alice-noscope", scopes=set())
    acme.add_user("bob", "gh-bob-noscope", scopes=set())
    acme.add_user("svc", "svc-password", {"read:org"})
    acme.add_member("acme", "svc")
    alone = await github_client(make_client, acme)
    resp = await alone.get("/tasks", headers=bearer("gh-bob-noscope"))
    assert resp.status == 403
    assert "read:org" in (await error(resp))["message"]

    client = await github_client(make_client, acme, auth_username="svc", auth_password="svc-password")
    acme.requests.clear()
    assert await status_of(client, "GET", "/tasks", bearer("gh-bob-noscope")) == 200
    assert await status_of(client, "GET", "/audit", bearer("gh-bob-noscope")) == 403
    assert await status_of(client, "GET", "/audit", bearer("gh-alice-noscope")) == 200
    service = {r.path for r in acme.requests if (r.authorization or "").startswith("Basic ")}
    assert service == {
        "/orgs/acme/members/bob",
        "/orgs/acme/teams/deployers/memberships/bob",
        "/orgs/acme/teams/deployers/memberships/alice",
    }
    expected = basic("svc", "svc-password")["Authorization"]
    assert {r.authorization for r in acme.requests if r.path.startswith("/orgs/")} == {expected}


async def test_github_enterprise_paths(make_client: ClientFactory, make_github: MakeGitHub) -> None:
    """Under /api/v3, pages of teams included: the API's path is kept on every request."""
    ghe = await make_github("/api/v3")
    ghe.add_user("alice", ALICE)
    ghe.add_user("bob", BOB)
    ghe.add_member("acme", "bob")
    ghe.add_team("acme", "deployers", ["alice"])
    ghe.add_teams("alice", "acme", 150)
    client = await github_client(make_client, ghe)
    assert await status_of(client, "GET", "/tasks", bearer(BOB)) == 200
    assert await status_of(client, "GET", "/audit", bearer(ALICE)) == 200
    assert ghe.requests and all(r.path.startswith("/api/v3/") for r in ghe.requests)
    alice_pages = [
        r for r in ghe.requests if r.path == "/api/v3/user/teams" and ALICE in str(r.authorization)
    ]
    assert len(alice_pages) == 2
    assert ghe.count("/api/v3/user") >= 4


# -- 6. the cache, and losing access ----------------------------------------------------------------


async def test_one_question_per_token_per_ttl(authed: Client, acme: FakeGitHub) -> None:
    for _ in range(5):
        assert await status_of(authed, "GET", "/tasks", bearer(BOB)) == 200
    assert user_calls(acme, BOB) == 1
    # Requests that come together share the one question (single flight).
    acme.mode = "hang"
    try:
        asking = [asyncio.ensure_future(status_of(authed, "GET", "/tasks", bearer(ALICE))) for _ in range(5)]
        await asyncio.wait_for(acme.wait_hanging(1), READ_DEADLINE)
    finally:
        acme.release_hang()
    assert await asyncio.gather(*asking) == [200] * 5
    assert user_calls(acme, ALICE) == 1


@pytest.mark.parametrize("how", ["remove_member", "revoke"])
async def test_access_lost_after_the_ttl(make_client: ClientFactory, acme: FakeGitHub, how: str) -> None:
    client = await github_client(make_client, acme, auth_cache_ttl=SHORT_TTL)
    assert await status_of(client, "GET", "/tasks", bearer(BOB)) == 200
    if how == "revoke":
        acme.revoke(BOB)
        await eventually_status(client, "/tasks", bearer(BOB), 401)
    else:
        acme.remove_member("acme", "bob")
        await eventually_status(client, "/tasks", bearer(BOB), 403)
    assert user_calls(acme, BOB) == 2  # asked again once, when the TTL was up


async def test_write_downgraded_to_read(make_client: ClientFactory, acme: FakeGitHub) -> None:
    client = await github_client(make_client, acme, auth_cache_ttl=SHORT_TTL)
    assert await status_of(client, "GET", "/audit", bearer(ALICE)) == 200
    acme.remove_team_member("acme", "deployers", "alice")  # still a member of acme
    await eventually_status(client, "/audit", bearer(ALICE), 403)
    resp = await client.post("/shop/prod", json={"action": "ok"}, headers=bearer(ALICE))
    assert resp.status == 403
    assert "alice has no write role" in (await error(resp))["message"]
    assert await status_of(client, "GET", "/tasks", bearer(ALICE)) == 200


async def test_events_stream_ends_when_member_removed(make_client: ClientFactory, acme: FakeGitHub) -> None:
    client = await github_client(make_client, acme, auth_cache_ttl=SHORT_TTL, keepalive=0.05)
    resp = await client.get("/events", headers=bearer(BOB))
    assert resp.status == 200
    # Still a member when the TTL is up: asked again, the stream goes on and brings news.
    await eventually(lambda: user_calls(acme, BOB) >= 2, READ_DEADLINE, "a second check of bob")
    created = await client.post("/shop/prod", json={"action": "ok"}, headers=bearer(ALICE))
    assert created.status == 200
    event = await next_event(resp)
    assert event is not None and event[0] == "task.create"
    acme.remove_member("acme", "bob")
    await ends_unauthorized(resp)


async def test_task_stream_ends_when_member_removed(make_client: ClientFactory, acme: FakeGitHub) -> None:
    client = await github_client(make_client, acme, auth_cache_ttl=SHORT_TTL, keepalive=0.05)
    created = await client.post("/shop/prod", json={"action": "hang"}, headers=bearer(ALICE))
    assert created.status == 200
    task_id = (await created.json())["taskId"]
    try:
        resp = await client.get(f"/task/{task_id}/stream", headers=bearer(BOB))
        assert resp.status == 200
        event = await next_event(resp)
        assert event is not None and event[0] == "state"
        acme.remove_member("acme", "bob")
        await ends_unauthorized(resp)
    finally:
        killed = await client.get(f"/task/{task_id}/kill", headers=bearer(ALICE))
        assert killed.status == 200, await killed.text()
    assert (await killed.json())["status"] == "killed"


async def test_websocket_closed_when_member_removed(make_client: ClientFactory, acme: FakeGitHub) -> None:
    client = await github_client(make_client, acme, auth_cache_ttl=SHORT_TTL, keepalive=0.05)
    ws = await client.ws_connect("/websocket", headers=bearer(BOB))
    received: list[str] = []

    async def read() -> None:
        # Reading all along: the client answers the server's heartbeat pings only so.
        async for message in ws:
            received.append(json.loads(message.data)["event"])

    reader = asyncio.ensure_future(read())
    try:
        await eventually(lambda: user_calls(acme, BOB) >= 2, READ_DEADLINE, "a second check of bob")
        created = await client.post("/shop/prod", json={"action": "ok"}, headers=bearer(ALICE))
        assert created.status == 200
        await eventually(lambda: "task.create" in received, READ_DEADLINE, "the news of a task")
        assert not ws.closed
        acme.remove_member("acme", "bob")
        await asyncio.wait_for(asyncio.shield(reader), READ_DEADLINE)  # ends as the server closes
    finally:
        reader.cancel()
        await ws.close()
    assert received[-1] == "unauthorized", received
    assert received.count("unauthorized") == 1
    assert ws.closed


# -- 7. the audit trail -----------------------------------------------------------------------------


async def test_audit_trail(authed: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pulsar_rest.audit")
    resp = await authed.post("/shop/prod", json={"action": "hang"}, headers=bearer(ALICE))
    assert resp.status == 200
    task_id = (await resp.json())["taskId"]
    resp = await authed.get(f"/task/{task_id}/kill", headers=bearer(ALICE))
    assert resp.status == 200, await resp.text()
    assert await status_of(authed, "GET", "/tasks", bearer(CAROL)) == 403
    resp = await authed.get("/audit", headers=bearer(BOB))
    assert resp.status == 403
    assert "bob has no write role" in (await error(resp))["message"]

    resp = await authed.get("/audit", headers=bearer(ALICE))
    assert resp.status == 200
    body = await resp.json()
    entries = body["entries"]
    assert body["total"] == len(entries) == 4
    assert [e["action"] for e in entries] == ["denied", "denied", "kill", "create"]  # newest first
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    bob_denied, carol_denied, kill, create = entries
    for entry in (kill, create):
        assert entry["who"] == "alice" and entry["remote"] == "127.0.0.1"
        assert entry["taskId"] == task_id
        assert entry["detail"] == "shop/prod hang", entry
        assert entry["at"]
    assert carol_denied["who"] == "carol" and carol_denied["taskId"] is None
    assert carol_denied["detail"].startswith("GET /tasks: carol has no read role")
    assert "carol is not a member of acme" in carol_denied["detail"]
    assert bob_denied["who"] == "bob" and bob_denied["detail"].startswith("GET /audit: bob has no write role")

    lines = [r.getMessage() for r in caplog.records if r.name == "pulsar_rest.audit"]
    assert lines == [
        f"create task {task_id} by alice from 127.0.0.1: shop/prod hang",
        f"kill task {task_id} by alice from 127.0.0.1: shop/prod hang",
        f"denied by carol from 127.0.0.1: {carol_denied['detail']}",
        f"denied by bob from 127.0.0.1: {bob_denied['detail']}",
    ]


async def test_created_by_and_its_filter(authed: Client, admin: TokenAdmin) -> None:
    bot = admin.create("deploy-bot", Role.WRITE, None)
    made: dict[str, int] = {}
    for who, headers in (("alice", bearer(ALICE)), ("token:deploy-bot", bearer(bot))):
        resp = await authed.post("/shop/prod", json={"action": "ok", "queue": True}, headers=headers)
        assert resp.status == 200, await resp.text()
        task = (await resp.json())["task"]
        assert task["createdBy"] == who
        made[who] = task["id"]
    for who, task_id in made.items():
        resp = await authed.get("/tasks", params={"createdBy": who, "output": "false"}, headers=bearer(BOB))
        assert resp.status == 200
        listed = await resp.json()
        assert listed["ids"] == [task_id] and listed["total"] == 1
        assert [t["createdBy"] for t in listed["tasks"].values()] == [who]


# -- 8. /status -------------------------------------------------------------------------------------


async def test_status_shows_more_to_readers(authed: Client, acme: FakeGitHub) -> None:
    for headers in ({}, bearer("gh-bad"), bearer(CAROL)):
        resp = await authed.get("/status", headers=headers)
        assert resp.status == 200
        assert set(await resp.json()) == {"ok", "version", "tasks"}, headers
    # An open route never has GitHub asked about a token: anonymous callers cannot make the
    # server spend GitHub's rate limit. A token GitHub vouched for lately is known, though.
    assert acme.requests == []
    for token in (BOB, ALICE):
        assert (await authed.get("/tasks", headers=bearer(token))).status == 200
        resp = await authed.get("/status", headers=bearer(token))
        assert resp.status == 200
        body = await resp.json()
        assert set(body) == {"ok", "version", "tasks", "waiters", "seq"}
        assert isinstance(body["seq"], int) and isinstance(body["waiters"], int)


# -- 9. secrets -----------------------------------------------------------------------------------


async def test_no_secret_in_logs_or_data(
    make_client: ClientFactory, acme: FakeGitHub, admin: TokenAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens and the service account's password reach neither a log (any logger, DEBUG)
    nor a file of the data directory; a token's digest may, and does (the store's key)."""
    for name in (None, "pulsar_rest", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    password = "svc-Pa55word-never-shown"
    acme.add_user("svc", password)
    acme.add_member("acme", "svc")
    noscope = "gh-erin-token-without-scope"
    acme.add_user("erin", noscope, scopes=set())
    acme.add_team("acme", "deployers", ["erin"])
    bad = "gh-bad-token-somebody-mistyped"
    bot = admin.create("deploy-bot", Role.WRITE, None)
    client = await github_client(
        make_client, acme, auth_username="svc", auth_password=password, auth_cache_ttl=SHORT_TTL
    )
    for headers in (bearer(ALICE), basic(BOB), bearer(CAROL), bearer(bad), bearer(noscope), bearer(bot)):
        await status_of(client, "GET", "/tasks", headers)
        await status_of(client, "GET", "/audit", headers)
        await status_of(client, "GET", "/me", headers)
        await status_of(client, "GET", "/status", headers)
    for headers in (bearer(ALICE), bearer(bot), bearer(noscope), bearer(BOB), bearer(bad)):
        await status_of(client, "POST", "/shop/prod", headers, json={"action": "ok", "queue": True})
    resp = await client.post("/shop/staging", json={"action": "hang"}, headers=bearer(ALICE))
    assert resp.status == 200, await resp.text()
    task_id = (await resp.json())["taskId"]
    assert await status_of(client, "GET", f"/task/{task_id}/kill", bearer(bot)) == 200
    acme.mode = "error500"
    assert await status_of(client, "GET", "/tasks", bearer("gh-unseen-token-in-an-outage")) == 503
    acme.mode = "ok"
    assert acme.count("/orgs/acme/") >= 1, "the service account was used"
    assert any(r.name == "pulsar_rest.audit" for r in caplog.records)

    secrets = [ALICE, BOB, CAROL, bad, noscope, bot, password, "gh-unseen-token-in-an-outage"]
    secrets.append(base64.b64encode(f"svc:{password}".encode()).decode())
    assert client.app is not None
    data_dir = client.app[SETTINGS].data_dir

    def scan() -> bytes:
        files = [p for p in data_dir.rglob("*") if p.is_file()]
        assert any(p.name == "pulsar-rest.db" for p in files)
        return b"".join(p.read_bytes() for p in files)

    for stored in (scan(), None):
        if stored is None:
            await client.close()  # the store's last writes, and its WAL folded in
            stored = scan()
        for secret in secrets:
            assert secret.encode() not in stored, f"{secret[:6]}... is in {data_dir}"
        assert digest(bot).encode() in stored  # what is kept instead: the scan sees the store
    for secret in secrets:
        assert secret not in caplog.text, f"{secret[:6]}... is in a log"


# -- 10. what the security review found -----------------------------------------------------------


class Clock:
    """The authenticator's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_answer_holds_until_it_was_given_for_not_from_each_request(
    github: FakeGitHub, admin: TokenAdmin, settings: Settings
) -> None:
    """A stream opened late in an answer's life is checked again when that answer expires,
    not a whole TTL later; pulsar-rest's own tokens are looked up again within a second."""
    import aiohttp as client_lib

    from pulsar_rest.auth.github import GitHubClient
    from pulsar_rest.auth.identity import Authenticator
    from pulsar_rest.store import SqliteStore

    github.add_user("bob", BOB)
    clock = Clock()
    store = SqliteStore(settings.data_dir)
    await store.open()
    own = admin.create("ci", Role.READ, None)
    async with client_lib.ClientSession() as session:
        authenticator = Authenticator(
            store=store,
            github=GitHubClient(session, github.url, github.api_url),
            read=parse_grants("bob", "user"),
            ttl=300,
            clock=clock,
        )
        first = await authenticator.verdict(BOB)
        clock.now += 200
        later = await authenticator.verdict(BOB)
        assert first is not None and later is not None
        assert first.until == later.until == 1300.0
        assert user_calls(github) == 1
        ours = await authenticator.verdict(own)
        assert ours is not None and ours.until == clock.now + 1.0
    await store.close()


async def test_made_up_tokens_never_push_out_real_users(
    authed: Client, acme: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pulsar_rest.auth.identity.CACHE_SIZE", 4)
    assert (await authed.get("/tasks", headers=bearer(BOB))).status == 200
    for n in range(10):
        assert (await authed.get("/tasks", headers=bearer(f"gh-made-up-{n}"))).status == 401
    asked = user_calls(acme, BOB)
    assert (await authed.get("/tasks", headers=bearer(BOB))).status == 200
    assert user_calls(acme, BOB) == asked  # bob's answer is still kept


async def test_anonymous_knocks_are_on_record_once_a_minute(authed: Client) -> None:
    for _ in range(5):
        assert (await authed.get("/tasks")).status == 401
    resp = await authed.get("/audit", headers=bearer(ALICE))
    entries = (await resp.json())["entries"]
    assert [e["detail"] for e in entries] == ["GET /tasks: no credentials"]


@pytest.mark.parametrize(
    "header",
    [
        "Basic " + base64.b64encode(b"abc\r\nX-Injected=1:x-oauth-basic").decode(),
        "Basic " + base64.b64encode(b"abc\x00def:x-oauth-basic").decode(),
        "Basic " + base64.b64encode(b"abc\x7fdef:x-oauth-basic").decode(),
        "Bearer " + "x" * 5000,
    ],
    ids=["crlf", "nul", "del", "huge"],
)
async def test_a_token_that_is_no_token_is_401_never_500(
    authed: Client, acme: FakeGitHub, header: str
) -> None:
    resp = await authed.get("/tasks", headers={"Authorization": header})
    assert resp.status == 401
    assert (await error(resp))["message"] == "Authorization: that is not a token"
    assert (await authed.get("/status", headers={"Authorization": header})).status == 200
    assert acme.requests == []
    # The refusal is on record, like any other.
    entries = (await (await authed.get("/audit", headers=bearer(ALICE))).json())["entries"]
    assert any("that is not a token" in e["detail"] for e in entries)


async def test_a_secondary_rate_limit_is_a_503_and_not_kept(
    make_client: ClientFactory, acme: FakeGitHub, auth_settings: Settings
) -> None:
    client = await make_client(
        auth_write=parse_grants("team:acme/deployers", "user"),
        github_url=acme.url,
        github_api_url=acme.api_url,
    )

    # GitHub's secondary limits come as a 403 with a message, without Retry-After.
    def secondary(request: web.Request) -> web.Response | None:
        if not request.path.endswith("/user/teams"):
            return None
        return web.json_response({"message": "You have exceeded a secondary rate limit."}, status=403)

    acme.overrides.append(secondary)
    resp = await client.get("/tasks", headers=bearer(ALICE))
    assert resp.status == 503 and "rate limit" in (await error(resp))["message"]
    acme.overrides.clear()
    assert (await client.get("/tasks", headers=bearer(ALICE))).status == 200


async def test_a_line_break_in_a_path_forges_no_audit_line(
    authed: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pulsar_rest.audit")
    assert (await authed.get("/task/1%0a2026-12-05 INFO pulsar_rest.audit: sign-in by admin")).status == 401
    assert all("\n" not in record.getMessage() for record in caplog.records)
    entries = (await (await authed.get("/audit", headers=bearer(ALICE))).json())["entries"]
    assert "\n" not in entries[-1]["detail"] and "%0a" in entries[-1]["detail"].lower()


async def test_a_page_too_far_is_a_400(authed: Client) -> None:
    resp = await authed.get("/audit", params={"page": "999999999999999999"}, headers=bearer(ALICE))
    assert resp.status == 400
