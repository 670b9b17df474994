"""A local GitHub: the REST API and OAuth web flow an authentication layer uses, over real HTTP.

The service's auth tests talk to this instead of github.com, so they run without a network and
can make GitHub misbehave (errors, rate limits, hangs, SAML enforcement) on demand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from yarl import URL

DOCS = "https://docs.github.com/rest"
MODES = frozenset({"ok", "error500", "hang", "ratelimit"})
# Scopes that grant reading org and team memberships (write and admin imply read, as on GitHub).
READ_ORG = frozenset({"read:org", "write:org", "admin:org"})
NO_SCOPE = "You need at least read:org scope or user scope to list your organization memberships."
SAML = (
    "Resource protected by organization SAML enforcement. "
    "You must grant your OAuth token access to this organization."
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY = web.RequestKey("body", object)  # the POST body, read once by the middleware


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it, so tests can assert what the service sent."""

    method: str
    path: str  # the full path, prefix included, without the query
    query: dict[str, str]
    authorization: str | None
    body: Any = None  # the form (as a dict) or JSON body of a POST


@dataclass
class Token:
    value: str
    login: str
    scopes: set[str]


@dataclass
class Team:
    id: int
    org: str
    slug: str
    members: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Grant:
    """What an authorization code stands for: who approved, and where the code was sent."""

    login: str
    redirect_uri: str


def problem(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"message": message, **extra}, status=status)


def not_found() -> web.Response:
    return problem(404, "Not Found", documentation_url=DOCS)


class FakeGitHub:
    """GitHub's state (users, tokens, orgs, teams, OAuth app) and an app that serves it.

    `prefix` is where the API lives: "" as on api.github.com, "/api/v3" as on GitHub
    Enterprise. The OAuth pages are always at the root. `url` and `api_url` are set once
    `start()` has bound a port.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix.rstrip("/")
        self.url = ""
        self.api_url = ""
        self.client_id = "test-client-id"
        self.client_secret = "test-client-secret"
        self.approve_as: str | None = None
        self.issued_tokens: list[str] = []
        self.saml_orgs: set[str] = set()
        self.saml_authorized: set[str] = set()  # tokens granted access to the saml_orgs
        self.requests: list[Recorded] = []
        # Answers a test puts first: each may answer a request (or None to let it pass).
        self.overrides: list[Callable[[web.Request], web.Response | None]] = []
        self.hanging = 0  # requests waiting now in "hang" mode
        self._mode = "ok"
        self._release = asyncio.Event()
        self._stopping = False
        self._arrivals = asyncio.Condition()
        self._tokens: dict[str, Token] = {}
        self._user_ids: dict[str, int] = {}
        self._org_ids: dict[str, int] = {}
        self._members: dict[str, dict[str, str]] = {}  # org -> login -> "active" | "pending"
        self._teams: dict[tuple[str, str], Team] = {}
        self._codes: dict[str, Grant] = {}
        self._next_id = 1000
        self._runner: web.AppRunner | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """How every request but the authorize page is met: "ok", "error500", "hang", "ratelimit"."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}: one of {sorted(MODES)}")
        if value == "hang" and self._release.is_set():
            self._release = asyncio.Event()  # a fresh hang after an earlier release
        self._mode = value

    def release_hang(self) -> None:
        """Let the hung requests go on (answered normally) and stop hanging new ones."""
        self._mode = "ok"
        self._release.set()

    async def wait_hanging(self, count: int = 1) -> None:
        """Until `count` requests are hung: the moment a test knows its request arrived."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: self.hanging >= count)

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add_user(self, login: str, token: str, scopes: set[str] | None = None) -> None:
        """Make `token` authenticate as `login` (scopes default to {"read:org"}); a user may have many."""
        self._user_ids.setdefault(login, self._id())
        self._tokens[token] = Token(token, login, {"read:org"} if scopes is None else set(scopes))

    def revoke(self, token: str) -> None:
        self._tokens.pop(token, None)

    def add_member(self, org: str, login: str, state: str = "active") -> None:
        if state not in ("active", "pending"):
            raise ValueError(f"membership state {state!r}: 'active' or 'pending'")
        self._org_ids.setdefault(org, self._id())
        self._user_ids.setdefault(login, self._id())
        self._members.setdefault(org, {})[login] = state

    def remove_member(self, org: str, login: str) -> None:
        """Leave the org and, as on GitHub, all of its teams."""
        self._members.get(org, {}).pop(login, None)
        for team in self._teams.values():
            if team.org == org:
                team.members.discard(login)

    def add_team(self, org: str, slug: str, members: list[str]) -> None:
        """A team of `members`; those not in the org yet join it as active members."""
        self._org_ids.setdefault(org, self._id())
        team = self._teams.setdefault((org, slug), Team(self._id(), org, slug))
        for login in members:
            if login not in self._members.get(org, {}):
                self.add_member(org, login)
            team.members.add(login)

    def remove_team_member(self, org: str, slug: str, login: str) -> None:
        team = self._teams.get((org, slug))
        if team:
            team.members.discard(login)

    def add_teams(self, login: str, org: str, count: int, stem: str = "team") -> list[str]:
        """`count` teams with `login` in each, for pagination: slugs sort in number order."""
        slugs = [f"{stem}-{n:04d}" for n in range(count)]
        for slug in slugs:
            self.add_team(org, slug, [login])
        return slugs

    def count(self, path_prefix: str) -> int:
        """How many requests came for paths starting with `path_prefix` (prefix included)."""
        return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def _state(self, org: str, login: str) -> str | None:
        return self._members.get(org, {}).get(login)

    # -- serving -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/login/oauth/authorize", self._authorize)
        app.router.add_post("/login/oauth/access_token", self._access_token)
        api = [
            ("/user", self._user),
            ("/user/memberships/orgs/{org}", self._membership),
            ("/user/teams", self._user_teams),
            ("/orgs/{org}/members/{username}", self._org_member),
            ("/orgs/{org}/teams/{slug}/memberships/{username}", self._team_membership),
        ]
        for path, handler in api:
            app.router.add_get(self.prefix + path, handler)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.api_url = self.url + self.prefix

    async def stop(self) -> None:
        """Stop serving; requests still hung are let go first, so shutdown does not wait on them."""
        self._stopping = True
        self._release.set()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGitHub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record the request, then fail it as `mode` says (but the authorize page never fails)."""
        body: Any = None
        if request.method == "POST":
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    body = None
            else:
                body = {k: str(v) for k, v in (await request.post()).items()}
        request[BODY] = body
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Authorization"),
                body,
            )
        )
        for override in self.overrides:
            answer = override(request)
            if answer is not None:
                return answer
        if request.path != "/login/oauth/authorize":
            if self._mode == "hang":
                await self._hang()
            if self._mode == "error500":
                return problem(500, "Server Error")
            if self._mode == "ratelimit":
                return self._rate_limited()
        return await handler(request)

    async def _hang(self) -> None:
        async with self._arrivals:
            self.hanging += 1
            self._arrivals.notify_all()
        try:
            await self._release.wait()
        finally:
            self.hanging -= 1
        if self._stopping:
            raise web.HTTPServiceUnavailable()

    def _rate_limited(self) -> web.Response:
        response = problem(
            403,
            "API rate limit exceeded for user ID 1.",
            documentation_url=f"{DOCS}/overview/rate-limits-for-the-rest-api",
        )
        response.headers.update(
            {
                "X-RateLimit-Limit": "5000",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time()) + 60),
                "X-RateLimit-Used": "5000",
                "X-RateLimit-Resource": "core",
            }
        )
        return response

    # -- API -----------------------------------------------------------------------------

    def _token(self, request: web.Request) -> Token:
        """The token's user, or the 401 GitHub answers a missing, unknown or revoked token with.

        `token T` and `Bearer T`, and Basic with the token as password (how a service account
        is often configured; the user name is not checked)."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        secret: str | None = value.strip()
        if scheme.lower() == "basic":
            try:
                secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                secret = None
        elif scheme.lower() not in ("token", "bearer"):
            secret = None
        token = self._tokens.get(secret) if secret else None
        if token is None:
            raise web.HTTPUnauthorized(
                text=json.dumps({"message": "Bad credentials", "documentation_url": DOCS}),
                content_type="application/json",
            )
        return token

    def _saml(self, org: str, token: Token) -> None:
        """The 403 for an org whose SAML SSO this token was never authorized for."""
        if self._saml_hidden(org, token):
            raise web.HTTPForbidden(
                text=json.dumps({"message": SAML, "documentation_url": DOCS}),
                content_type="application/json",
                headers={"X-GitHub-SSO": f"required; url={self.url}/orgs/{org}/sso"},
            )

    def _saml_hidden(self, org: str, token: Token) -> bool:
        return org in self.saml_orgs and token.value not in self.saml_authorized

    @staticmethod
    def _need_read_org(token: Token) -> None:
        if not token.scopes & READ_ORG:
            raise web.HTTPForbidden(
                text=json.dumps({"message": NO_SCOPE, "documentation_url": DOCS}),
                content_type="application/json",
            )

    @staticmethod
    def _json(data: Any, token: Token, status: int = 200) -> web.Response:
        response = web.json_response(data, status=status)
        response.headers["X-OAuth-Scopes"] = ", ".join(sorted(token.scopes))
        return response

    async def _user(self, request: web.Request) -> web.Response:
        token = self._token(request)
        body = {"login": token.login, "id": self._user_ids[token.login], "type": "User"}
        return self._json(body, token)

    async def _membership(self, request: web.Request) -> web.Response:
        token = self._token(request)
        self._need_read_org(token)
        org = request.match_info["org"]
        self._saml(org, token)
        state = self._state(org, token.login)
        if state is None:
            return not_found()
        body = {
            "url": f"{self.api_url}/orgs/{org}/memberships/{token.login}",
            "state": state,
            "role": "member",
            "organization": {"login": org, "id": self._org_ids[org]},
            "user": {"login": token.login, "id": self._user_ids[token.login]},
        }
        return self._json(body, token)

    async def _org_member(self, request: web.Request) -> web.StreamResponse:
        """204 or 404 for a member asking; a redirect to the public list for anyone else."""
        token = self._token(request)
        org, username = request.match_info["org"], request.match_info["username"]
        self._saml(org, token)
        if self._state(org, token.login) != "active":
            location = f"{self.api_url}/orgs/{org}/public_members/{username}"
            return web.Response(status=302, headers={"Location": location})
        if self._state(org, username) != "active":
            return not_found()
        return web.Response(status=204, headers={"X-OAuth-Scopes": ", ".join(sorted(token.scopes))})

    async def _user_teams(self, request: web.Request) -> web.Response:
        token = self._token(request)
        self._need_read_org(token)
        per_page = min(max(_int(request.query.get("per_page"), 30), 1), 100)
        page = max(_int(request.query.get("page"), 1), 1)
        mine = sorted(
            (t.org, t.slug, t)
            for t in self._teams.values()
            if token.login in t.members and self._state(t.org, token.login) == "active"
        )
        hidden = sorted({org for org, _, _ in mine if self._saml_hidden(org, token)})
        teams = [
            {
                "id": t.id,
                "slug": t.slug,
                "name": t.slug,
                "url": f"{self.api_url}/orgs/{t.org}/teams/{t.slug}",
                "organization": {"login": t.org, "id": self._org_ids[t.org]},
            }
            for org, _, t in mine
            if not self._saml_hidden(org, token)
        ]
        response = self._json(teams[(page - 1) * per_page : page * per_page], token)
        last = max(-(-len(teams) // per_page), 1)
        if last > 1:
            response.headers["Link"] = self._links(per_page, page, last)
        if hidden:  # GitHub leaves out what the token may not see, and says so
            ids = ",".join(str(self._org_ids[org]) for org in hidden)
            response.headers["X-GitHub-SSO"] = f"partial-results; organizations={ids}"
        return response

    def _links(self, per_page: int, page: int, last: int) -> str:
        """The Link header as GitHub orders it: prev, next, last, first."""
        rels: list[tuple[str, int]] = []
        if page > 1:
            rels.append(("prev", min(page - 1, last)))
        if page < last:
            rels += [("next", page + 1), ("last", last)]
        if page > 1:
            rels.append(("first", 1))
        url = f"{self.api_url}/user/teams"
        return ", ".join(
            f'<{url}?{urlencode({"per_page": per_page, "page": n})}>; rel="{rel}"' for rel, n in rels
        )

    async def _team_membership(self, request: web.Request) -> web.Response:
        token = self._token(request)
        org, slug, username = (request.match_info[k] for k in ("org", "slug", "username"))
        self._saml(org, token)
        team = self._teams.get((org, slug))
        if self._state(org, token.login) != "active" or team is None or username not in team.members:
            return not_found()
        body = {
            "url": f"{self.api_url}/teams/{team.id}/memberships/{username}",
            "role": "member",
            "state": "active" if self._state(org, username) == "active" else "pending",
        }
        return self._json(body, token)

    async def _unknown(self, request: web.Request) -> web.Response:
        return not_found()

    # -- OAuth web flow ------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        """The page the user is sent to: redirect back with a code if `approve_as` approves."""
        query = request.query
        if query.get("client_id") != self.client_id:
            return web.Response(status=404, text="Not Found")
        if self.approve_as is None:
            page = "<!DOCTYPE html><html><head><title>Sign in to GitHub</title></head>"
            page += "<body><h1>Sign in to GitHub</h1></body></html>"
            return web.Response(text=page, content_type="text/html")
        redirect_uri = query.get("redirect_uri")
        if not redirect_uri:
            return web.Response(status=400, text="this fake needs a redirect_uri")
        code = secrets.token_hex(10)
        self._codes[code] = Grant(self.approve_as, redirect_uri)
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        raise web.HTTPFound(URL(redirect_uri).update_query(params))

    async def _access_token(self, request: web.Request) -> web.Response:
        """Exchange a code for a new token; errors come with status 200, as GitHub sends them."""
        body = request[BODY]
        given = {**request.query, **(body if isinstance(body, dict) else {})}
        as_json = "application/json" in request.headers.get("Accept", "")
        if given.get("client_id") != self.client_id or given.get("client_secret") != self.client_secret:
            return _oauth_error(
                "incorrect_client_credentials",
                "The client_id and/or client_secret passed are incorrect.",
                as_json,
            )
        grant = self._codes.get(str(given.get("code")))
        if grant is None:
            return _oauth_error("bad_verification_code", "The code passed is incorrect or expired.", as_json)
        if "redirect_uri" in given and given["redirect_uri"] != grant.redirect_uri:
            return _oauth_error(
                "redirect_uri_mismatch",
                "The redirect_uri MUST match the registered callback URL for this application.",
                as_json,
            )
        del self._codes[str(given["code"])]
        token = "gho_" + secrets.token_hex(18)
        self.add_user(grant.login, token, {"read:org"})
        self.issued_tokens.append(token)
        return _oauth_answer({"access_token": token, "token_type": "bearer", "scope": "read:org"}, as_json)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _oauth_answer(data: dict[str, str], as_json: bool) -> web.Response:
    """JSON when asked for, else form-encoded: GitHub's default for the token exchange."""
    if as_json:
        return web.json_response(data)
    return web.Response(text=urlencode(data), content_type="application/x-www-form-urlencoded")


def _oauth_error(error: str, description: str, as_json: bool) -> web.Response:
    uri = "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors"
    return _oauth_answer({"error": error, "error_description": description, "error_uri": uri}, as_json)


MakeGitHub = Callable[..., Awaitable[FakeGitHub]]


@pytest.fixture
async def make_github() -> AsyncIterator[MakeGitHub]:
    """Start fakes with a given API prefix ("/api/v3" for Enterprise); all stop at the end."""
    started: list[FakeGitHub] = []

    async def make(prefix: str = "") -> FakeGitHub:
        fake = FakeGitHub(prefix)
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def github() -> AsyncIterator[FakeGitHub]:
    """A running fake of github.com: the API at the root, like api.github.com."""
    async with FakeGitHub() as fake:
        yield fake
