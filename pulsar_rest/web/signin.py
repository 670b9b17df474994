"""Browser sign-in with GitHub (the OAuth web flow) and the session it leaves.

`GET /login` sends the browser to GitHub with a single-use random `state`, kept meanwhile
in a short-lived encrypted cookie; `GET /login/callback` checks it (constant time, once),
exchanges the code for a token and starts a new session (never the one the browser came
with: no fixation). The session is an aiohttp-session encrypted cookie holding the GitHub
token and a CSRF token; the token's identity and roles are checked as any other token's,
so a removed member loses access within --auth-cache-ttl.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
import warnings
from collections import deque
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.web_exceptions import NotAppKeyWarning
from aiohttp_session import AbstractStorage, Session, get_session, new_session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography import fernet

from pulsar_rest.audit import AuditAction
from pulsar_rest.auth.github import BadCredentials, GitHubUnavailable
from pulsar_rest.auth.identity import Unauthenticated
from pulsar_rest.settings import Settings
from pulsar_rest.web.auth import CREDENTIAL, IDENTITY, SESSION_CSRF, SESSION_TOKEN
from pulsar_rest.web.errors import ApiError
from pulsar_rest.web.keys import AUDIT, GATEKEEPER, SETTINGS, SIGN_IN
from pulsar_rest.web.params import url

log = logging.getLogger(__name__)

# aiohttp-session keeps the session under a text key of the request, which aiohttp warns of
# once: its own business, not a fault of ours.
warnings.filterwarnings("ignore", category=NotAppKeyWarning, module="aiohttp_session")

KEY_FILE = "session.key"  # in the data directory, when no --session-key-file is given
STATE_COOKIE = "pulsar_oauth_state"
STATE_TTL = 600  # seconds a sign-in may take at GitHub
MAX_SIGN_INS = 100_000  # sign-ins begun within STATE_TTL, beyond which they wait
SCOPE = "read:org"  # enough to see the user's private organisation and team memberships


class SignInSetupError(RuntimeError):
    """The session keys cannot be had: the message is one line for the user."""


def session_keys(settings: Settings) -> list[bytes]:
    """The session keys: --session-key-file's lines (the first makes new sessions, all of
    them open existing ones, so a key can be rotated), or one made once and kept in the
    data directory (mode 0600), so sessions survive a restart."""
    path = settings.session_key_file
    if path is None:
        path = settings.data_dir / KEY_FILE
        try:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SignInSetupError(f"cannot make the session key {path}: {exc.strerror or exc}") from None
        else:
            with os.fdopen(descriptor, "wb") as made:
                made.write(fernet.Fernet.generate_key() + b"\n")
    return _read_keys(path)


def _read_keys(path: Path) -> list[bytes]:
    try:
        lines = path.read_bytes().split()
    except OSError as exc:
        raise SignInSetupError(f"cannot read the session keys {path}: {exc.strerror or exc}") from None
    for number, key in enumerate(lines, 1):
        try:
            fernet.Fernet(key)
        except ValueError:
            raise SignInSetupError(
                f"{path}, key {number}: not a session key (32 url-safe base64-encoded bytes; "
                'make one with: python3 -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())")'
            ) from None
    if not lines:
        raise SignInSetupError(f"{path} holds no session key")
    return lines


class RotatingCookieStorage(EncryptedCookieStorage):
    """aiohttp-session's encrypted cookie, with several keys: new sessions are encrypted
    with the first, and a session made with any of them is read."""

    def __init__(self, keys: list[bytes], **kwargs: object) -> None:
        super().__init__(fernet.Fernet(keys[0]), **kwargs)  # type: ignore[arg-type]
        # MultiFernet has Fernet's encrypt() and decrypt(ttl=), all the storage uses.
        self._fernet = fernet.MultiFernet([fernet.Fernet(key) for key in keys])  # type: ignore[assignment]

    async def load_session(self, request: web.Request) -> Session:
        try:
            return await super().load_session(request)
        except (UnicodeError, ValueError):  # a cookie no browser of ours sent: no session
            return Session(None, data=None, new=True, max_age=self.max_age)

    def save_cookie(
        self, response: web.StreamResponse, cookie_data: str, *, max_age: int | None = None
    ) -> None:
        if cookie_data:
            super().save_cookie(response, cookie_data, max_age=max_age)
            return
        # Emptied with the attributes it was set with: a browser ignores the deletion of a
        # __Host- cookie that does not say Secure (and the user would stay signed in).
        params = self.cookie_params
        response.del_cookie(
            self.cookie_name,
            path=params["path"],
            secure=params["secure"],
            httponly=params["httponly"],
            samesite=params["samesite"],
        )


class SignIn:
    def __init__(self, settings: Settings, keys: list[bytes]) -> None:
        self.settings = settings
        self._fernet = fernet.MultiFernet([fernet.Fernet(key) for key in keys])
        self.secure = settings.tls or (settings.public_url or "").startswith("https://")
        # A used state is refused again for as long as its cookie could be replayed: the
        # states, and when each may be forgotten, oldest first.
        self._used: set[str] = set()
        self._used_order: deque[tuple[float, str]] = deque()
        self.state_cookie = f"__Host-{STATE_COOKIE}" if self.secure else STATE_COOKIE
        self.storage: AbstractStorage = RotatingCookieStorage(
            keys,
            # __Host-: the browser keeps it to this host, on https, for every path.
            cookie_name="__Host-pulsar_session" if self.secure else "pulsar_session",
            max_age=int(settings.session_max_age),
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )

    def seal(self, data: dict[str, str]) -> str:
        return self._fernet.encrypt(json.dumps(data).encode()).decode()

    def unseal(self, sealed: str | None) -> dict[str, str] | None:
        if not sealed:
            return None
        try:
            data = json.loads(self._fernet.decrypt(sealed.encode(), ttl=STATE_TTL))
        except (fernet.InvalidToken, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def spend(self, state: str) -> bool:
        """Mark `state` used; False if it was already."""
        now = time.monotonic()
        while self._used_order and self._used_order[0][0] <= now:
            self._used.discard(self._used_order.popleft()[1])
        if state in self._used:
            return False
        if len(self._used) >= MAX_SIGN_INS:
            raise ApiError(503, "too many sign-ins in the last minutes: try again later")
        self._used.add(state)
        self._used_order.append((now + STATE_TTL, state))
        return True

    def callback_url(self, request: web.Request) -> str:
        if self.settings.public_url:
            return self.settings.public_url + "/login/callback"
        return url(request, "/login/callback")


def _sign_in(request: web.Request) -> SignIn:
    if SIGN_IN not in request.app:
        raise ApiError(
            404,
            "browser sign-in is not configured: start pulsar-rest with --oauth-client-id and "
            "--oauth-client-secret-file (API clients send a token instead)",
        )
    return request.app[SIGN_IN]


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of this service only, never another site (nor
    a character a Location header cannot hold)."""
    if not value or not value.startswith("/") or value.startswith("//"):
        return "/"
    if not all(0x21 <= ord(c) <= 0x7E and c != "\\" for c in value):
        return "/"
    return value


async def login(request: web.Request) -> web.Response:
    """Off to GitHub's authorisation page, with a new single-use state."""
    sign_in = _sign_in(request)
    settings = request.app[SETTINGS]
    state = secrets.token_urlsafe(32)
    query = {
        "client_id": settings.oauth_client_id or "",
        "redirect_uri": sign_in.callback_url(request),
        "scope": SCOPE,
        "state": state,
        "allow_signup": "false",
    }
    response = web.Response(
        status=302, headers={"Location": f"{settings.github_url}/login/oauth/authorize?{urlencode(query)}"}
    )
    sealed = sign_in.seal({"state": state, "next": safe_next(request.query.get("next"))})
    response.set_cookie(
        sign_in.state_cookie,
        sealed,
        max_age=STATE_TTL,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=sign_in.secure,
    )
    return response


async def callback(request: web.Request) -> web.Response:
    """GitHub sends the browser back here with a code and the state it was given."""
    sign_in = _sign_in(request)
    settings = request.app[SETTINGS]
    saved = sign_in.unseal(request.cookies.get(sign_in.state_cookie))
    given = request.query.get("state", "")
    if saved is None or not isinstance(saved.get("state"), str):
        _refuse(request, "the sign-in state is missing or expired: sign in again")
    if not hmac.compare_digest(saved["state"].encode(), given.encode()):
        _refuse(request, "the sign-in state does not match: sign in again")
    if not sign_in.spend(saved["state"]):
        _refuse(request, "this sign-in was already used: sign in again")
    if "error" in request.query:
        _refuse(request, f"GitHub did not sign you in ({request.query['error'][:80]})")
    code = request.query.get("code", "")
    if not code:
        _refuse(request, "GitHub sent no code: sign in again")
    gatekeeper = request.app[GATEKEEPER]
    assert gatekeeper.github is not None  # browser sign-in is GitHub's
    try:
        token = await gatekeeper.github.exchange_code(
            settings.oauth_client_id or "",
            settings.oauth_client_secret or "",
            code,
            sign_in.callback_url(request),
        )
        identity = await gatekeeper.authenticator.identify(token)
    except (BadCredentials, Unauthenticated) as exc:
        _refuse(request, str(exc))
    except GitHubUnavailable as exc:
        raise ApiError(503, f"{exc}: sign in again later") from None
    # A new session: whatever session the browser came with is not carried on (fixation).
    session = await new_session(request)
    session[SESSION_TOKEN] = token
    session[SESSION_CSRF] = secrets.token_urlsafe(32)
    session["login"] = identity.name
    request.app[AUDIT].record(
        AuditAction.SIGN_IN, identity.name, request.remote, f"roles: {', '.join(identity.roles) or 'none'}"
    )
    response = web.Response(status=302, headers={"Location": saved.get("next") or "/"})
    response.del_cookie(sign_in.state_cookie, path="/", secure=sign_in.secure, httponly=True, samesite="Lax")
    return response


def _refuse(request: web.Request, reason: str) -> NoReturn:
    request.app[AUDIT].record(AuditAction.DENIED, None, request.remote, f"sign-in: {reason}")
    raise ApiError(403, reason)


async def logout(request: web.Request) -> web.Response:
    """End the browser's session (its cookie is emptied); from this service's pages only."""
    _sign_in(request)
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != request.app[GATEKEEPER].origin(request):
        raise ApiError(403, f"cross-origin request refused (Origin {origin[:100]!r})")
    session = await get_session(request)
    who = session.get("login")
    if who:
        request.app[AUDIT].record(AuditAction.SIGN_OUT, str(who), request.remote)
    session.invalidate()
    return web.json_response({"signedOut": True})


async def me(request: web.Request) -> web.Response:
    """Who the page is used by: login, roles, and the CSRF token its POSTs carry."""
    settings = request.app[SETTINGS]
    if not settings.auth:
        return web.json_response(
            {"login": None, "roles": ["read", "write"], "csrfToken": None, "auth": False}
        )
    identity = request.get(IDENTITY)
    if identity is None:
        raise ApiError(401, "not signed in", {"WWW-Authenticate": 'Bearer realm="pulsar-rest"'})
    csrf = None
    if request[CREDENTIAL].via == "cookie":
        csrf = (await get_session(request)).get(SESSION_CSRF)
    return web.json_response(
        {
            "login": identity.name,
            "roles": identity.roles,
            "csrfToken": csrf,
            "why": identity.why_not or None,
            "auth": True,
        }
    )
