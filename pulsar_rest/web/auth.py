"""Who is asking, and may they: every route's access in one table (see routes.py), checked
by one middleware, deny by default.

Credentials come from the `Authorization` header (a GitHub token or one of pulsar-rest's:
`Bearer T`, `token T`, or basic `T:x-oauth-basic` as the original service's clients send)
or from the browser's session cookie. Never from the URL: URLs end up in logs. A request
that changes tasks with the cookie must also carry the session's CSRF token and come from
this service's origin; with a header it needs neither (a browser never adds one by itself).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import logging
import re
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
    # An open route that wants to know who asks even when GitHub must be asked (/me). Other
    # open routes take a known identity only: anonymous requests never make GitHub calls.
    identify: bool = False


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
_TOKEN = re.compile(r"[\x21-\x7e]{1,1024}")
# Requests without credentials from one address are on record once in this many seconds.
KNOCKS_EVERY = 60.0


class Gatekeeper:
    def __init__(
        self, settings: Settings, authenticator: Authenticator, audit: Audit, github: GitHubClient | None
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.audit = audit
        self.github = github  # None: GitHub is not asked (no authentication, or our tokens only)
        self._knocks: dict[str | None, float] = {}  # when each address was last refused unnamed

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
        except ApiError as exc:
            if needed is None:
                return  # an open route is served whatever the header: a proxy's basic auth, say
            self._deny(request, None, exc.message)
            raise
        if credential is None:
            if needed is not None:
                self._deny(request, None, "no credentials")
                raise ApiError(401, "authentication required: sign in, or send a token", _CHALLENGE)
            return
        try:
            verdict = await self.authenticator.verdict(
                credential.token, cached_only=needed is None and not rule.identify
            )
        except Unauthenticated as exc:
            if needed is None:
                return  # an open route, for someone whose session has ended
            self._deny(request, None, str(exc))
            raise ApiError(401, str(exc), _CHALLENGE) from None
        except GitHubUnavailable as exc:
            if needed is None:
                return
            raise _unavailable(exc) from None
        if verdict is None:
            return  # an open route, and a token GitHub was not asked about lately
        identity = verdict.identity
        request[IDENTITY] = identity
        request[CREDENTIAL] = credential
        request[CHECKED_UNTIL] = verdict.until
        if needed is None:
            return
        if not identity.allows(needed):
            reason = f"{identity.name} has no {needed} role: {identity.why_not}"
            self._deny(request, identity.name, reason)
            raise ApiError(403, reason)
        if credential.via == "cookie":
            await self._check_forgery(request, identity, rule)

    async def recheck(self, request: web.Request, rule: Rule) -> None:
        """For a stream or a long-poll that outlives the check made at its start: raise the
        401, 403 or 503 that would refuse it now. GitHub is asked again only once the
        answer the check had has expired (--auth-cache-ttl)."""
        if not self.settings.auth or rule.access.role is None:
            return
        if self.authenticator.clock() < request[CHECKED_UNTIL]:
            return
        try:
            verdict = await self.authenticator.verdict(request[CREDENTIAL].token)
        except Unauthenticated as exc:
            raise ApiError(401, f"your credentials are no longer valid: {exc}", _CHALLENGE) from None
        except GitHubUnavailable as exc:  # after its time, an answer that cannot be had fails closed
            raise _unavailable(exc) from None
        assert verdict is not None
        request[CHECKED_UNTIL] = verdict.until
        request[IDENTITY] = verdict.identity
        if not verdict.identity.allows(rule.access.role):
            raise ApiError(403, f"{verdict.identity.name} has no {rule.access.role} role now")

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
        if who is None and reason == "no credentials" and not self._first_in_a_while(request.remote):
            return  # an anonymous caller knocking again: once a minute is on record enough
        # The path as it came (percent-encoded: no line breaks), and not all of it.
        path = request.raw_path if len(request.raw_path) <= 200 else request.raw_path[:200] + "..."
        self.audit.record(AuditAction.DENIED, who, request.remote, f"{request.method} {path}: {reason}")

    def _first_in_a_while(self, remote: str | None) -> bool:
        now = self.authenticator.clock()
        if len(self._knocks) > 10_000:
            self._knocks = {k: t for k, t in self._knocks.items() if now - t < KNOCKS_EVERY}
        if now - self._knocks.get(remote, -KNOCKS_EVERY) < KNOCKS_EVERY:
            return False
        self._knocks[remote] = now
        return True


def _token_of(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    token = value.strip()
    if scheme.lower() == "basic":
        try:
            user, _, second = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError(401, "Authorization: basic credentials that do not decode", _CHALLENGE) from None
        if second != "x-oauth-basic":
            raise ApiError(401, "Authorization: basic credentials must be TOKEN:x-oauth-basic", _CHALLENGE)
        token = user
    elif scheme.lower() not in ("bearer", "token"):
        raise ApiError(401, "Authorization: send 'Bearer TOKEN' (or 'token TOKEN')", _CHALLENGE)
    # A token is printable ASCII: anything else is no token (and must not reach a header).
    if not _TOKEN.fullmatch(token):
        raise ApiError(401, "Authorization: that is not a token", _CHALLENGE)
    return token


def _unavailable(exc: GitHubUnavailable) -> ApiError:
    # A GitHub that is down or slow passes: try again in a while, if it did not say when.
    headers = {"Retry-After": str(exc.retry_after or 10)}
    return ApiError(503, f"{exc}: who you are cannot be checked now, try again later", headers)


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
    # A long-poll answered after the identity's time is up must still be allowed. Not a
    # change: it was made, and a refusal now would have the client make it again.
    if not response.prepared and not rule.changes:
        await gatekeeper.recheck(request, rule)
    return response
