"""Who is asking, and may they: every route's access in one table (see routes.py), checked
by one middleware, deny by default.

Credentials come from the `Authorization` header (a GitHub token or one of pulsar-rest's:
`Bearer T`, `token T`, or basic `T:x-oauth-basic` as the original service's clients send)
or from the browser's session cookie. Never from the URL: URLs end up in logs. A request
that changes tasks with the cookie must also carry the session's CSRF token and come from
this service's origin; with a header it needs neither (a browser never adds one by itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hmac
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_session import get_session
from yarl import URL

from pulsar_rest.audit import Audit, AuditAction
from pulsar_rest.auth.github import GitHubClient, GitHubUnavailable
from pulsar_rest.auth.grants import Role
from pulsar_rest.auth.identity import Authenticator, Identity, Unauthenticated
from pulsar_rest.settings import Settings
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.keys import GATEKEEPER, RULES

log = logging.getLogger(__name__)


class Access(enum.Enum):
    OPEN = "open"  # anyone: the page, sign-in, /status (which then shows less)
    READ = "read"  # see tasks, apps, output, logs; follow them
    WRITE = "write"  # create and kill tasks, read the audit

    @property
    def role(self) -> Role | None:
        return None if self is Access.OPEN else Role(self.value)


@dataclass(frozen=True)
class Rule:
    access: Access
    changes: bool = False  # changes tasks: by the cookie, only as a POST with the CSRF token


@dataclass(frozen=True)
class Credential:
    token: str
    via: str  # "header" or "cookie"


# What the middleware leaves on the request for the handlers.
IDENTITY = web.RequestKey("identity", Identity)
CREDENTIAL = web.RequestKey("credential", Credential)
CHECKED_UNTIL = web.RequestKey("checked_until", float)  # loop time the identity holds until

# Keys in the session: its GitHub token (whose identity is checked as any other's) and
# its CSRF token.
SESSION_TOKEN = "token"  # noqa: S105 (a key's name)
SESSION_CSRF = "csrf"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pulsar-rest"'}


class Gatekeeper:
    def __init__(
        self, settings: Settings, authenticator: Authenticator, audit: Audit, github: GitHubClient | None
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.audit = audit
        self.github = github  # None: GitHub is not asked (no authentication, or our tokens only)

    async def admit(self, request: web.Request, rule: Rule) -> None:
        """Leave the identity on the request, or raise the 401, 403 or 503 that refuses it."""
        if not self.settings.auth:
            request[IDENTITY] = Identity(request.remote or "unknown", Role.WRITE)
            return
        if "access_token" in request.query:
            raise ApiError(
                400, "a token is never taken from the URL (URLs end up in logs): send Authorization"
            )
        needed = rule.access.role
        try:
            credential = await self._credential(request)
        except ApiError:
            if needed is not None:
                raise
            # An open route is served whatever the header: a proxy's own basic auth, say.
            credential = None
        if credential is None:
            if needed is not None:
                self._deny(request, None, "no credentials")
                raise ApiError(401, "authentication required: sign in, or send a token", _CHALLENGE)
            return
        try:
            identity = await self.authenticator.identify(credential.token)
        except Unauthenticated as exc:
            if needed is None:
                return  # an open route, for someone whose session has ended
            self._deny(request, None, str(exc))
            raise ApiError(401, str(exc), _CHALLENGE) from None
        except GitHubUnavailable as exc:
            if needed is None:
                return
            headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
            raise ApiError(
                503, f"{exc}: who you are cannot be checked now, try again later", headers
            ) from None
        request[IDENTITY] = identity
        request[CREDENTIAL] = credential
        request[CHECKED_UNTIL] = _now() + self.authenticator.ttl
        if needed is None:
            return
        if not identity.allows(needed):
            reason = f"{identity.name} has no {needed} role: {identity.why_not}"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)
        if credential.via == "cookie":
            await self._check_forgery(request, identity, rule)

    async def still_admitted(self, request: web.Request, rule: Rule) -> bool:
        """For a stream or a long-poll that outlives the check made at its start: is its
        identity still valid for its route? Asked again once the answer's time is up."""
        if not self.settings.auth or rule.access.role is None:
            return True
        if _now() < request[CHECKED_UNTIL]:
            return True
        try:
            identity = await self.authenticator.identify(request[CREDENTIAL].token)
        except (Unauthenticated, GitHubUnavailable):
            return False  # after its time, an answer that cannot be had again fails closed
        request[CHECKED_UNTIL] = _now() + self.authenticator.ttl
        request[IDENTITY] = identity
        return identity.allows(rule.access.role)

    async def _credential(self, request: web.Request) -> Credential | None:
        header = request.headers.get("Authorization")
        if header is not None:
            return Credential(_token_of(header), "header")
        if not self.settings.browser_sign_in:
            return None
        session = await get_session(request)
        token = session.get(SESSION_TOKEN)
        return Credential(token, "cookie") if isinstance(token, str) and token else None

    async def _check_forgery(self, request: web.Request, identity: Identity, rule: Rule) -> None:
        """A request with the session cookie comes from this service's pages: never from
        another origin (a WebSocket, which no CORS protects, included), and a change also
        carries the session's CSRF token."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() != self.origin(request):
            reason = f"cross-origin request refused (Origin {origin[:100]!r})"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)
        if not rule.changes:
            return
        if request.method != "POST":
            reason = "a browser session changes tasks with POST (and X-CSRF-Token) only"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)
        if origin is None:
            reason = "cross-origin request refused: a change from a browser session must say its Origin"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)
        session = await get_session(request)
        expected = session.get(SESSION_CSRF)
        given = request.headers.get("X-CSRF-Token", "")
        if not isinstance(expected, str) or not hmac.compare_digest(expected.encode(), given.encode()):
            reason = "missing or wrong X-CSRF-Token (GET /me gives it)"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)

    def origin(self, request: web.Request) -> str:
        """This service's origin, as browsers name it in `Origin`."""
        if self.settings.public_url:
            url = URL(self.settings.public_url)
            return str(url.origin()).lower()
        return f"{request.scheme}://{request.host}".lower()

    def _deny(self, request: web.Request, who: str | None, reason: str) -> None:
        self.audit.record(
            AuditAction.DENIED, who, request.remote, f"{request.method} {request.path}: {reason}"
        )


def _token_of(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() in ("bearer", "token") and value:
        return value
    if scheme.lower() == "basic":
        try:
            user, _, second = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError(401, "Authorization: basic credentials that do not decode", _CHALLENGE) from None
        if second == "x-oauth-basic" and user:
            return user
        raise ApiError(401, "Authorization: basic credentials must be TOKEN:x-oauth-basic", _CHALLENGE)
    raise ApiError(401, "Authorization: send 'Bearer TOKEN' (or 'token TOKEN')", _CHALLENGE)


def _now() -> float:
    return asyncio.get_running_loop().time()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rule = request.app[RULES].get(request.match_info.route)
    if rule is None:
        if request.match_info.http_exception is not None:
            return await handler(request)  # no route: its 404 or 405 shows nothing
        # Deny by default: a route added without its rule is refused to everybody.
        log.error("no access rule for %s %s: refused", request.method, request.match_info.route)
        raise ApiError(403, "this route has no access rule")
    gatekeeper = request.app[GATEKEEPER]
    await gatekeeper.admit(request, rule)
    response = await handler(request)
    # A long-poll answered after the identity's time is up: it must still hold.
    if not response.prepared and not await gatekeeper.still_admitted(request, rule):
        raise ApiError(401, "your credentials are no longer valid", _CHALLENGE)
    return response
