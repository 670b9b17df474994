"""Browser sign-in with GitHub: the OAuth web flow against the fake GitHub, the session
cookie it leaves, CSRF and Origin checks on cookie requests, logout, session keys."""

from __future__ import annotations

import asyncio
import ssl
import stat
import subprocess
from collections.abc import Callable
from dataclasses import replace
from http.cookies import Morsel, SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from aiohttp.abc import AbstractCookieJar
from cryptography.fernet import Fernet
from yarl import URL

from pulsar_rest.auth.grants import parse_grants
from pulsar_rest.settings import Settings
from pulsar_rest.web.app import create_app
from pulsar_rest.web.signin import SignInSetupError
from tests.conftest import Client, ClientFactory, follow
from tests.fake_github import FakeGitHub
from tests.serving import ROOT, listening_port, stop

ALICE_TOKEN, BOB_TOKEN = "gh-alice-api-token", "gh-bob-api-token"
SESSION = "pulsar_session"
SECURE_SESSION = "__Host-pulsar_session"
STATE = "pulsar_oauth_state"
SECURE_STATE = "__Host-pulsar_oauth_state"  # on https: no sibling subdomain can plant one
EXCHANGE = "/login/oauth/access_token"
SSL_DIR = ROOT / "bin" / "ssl"


@pytest.fixture
def acme(github: FakeGitHub) -> FakeGitHub:
    """alice may write (user grant), bob may read (a member of org acme); each has an API token."""
    github.add_user("alice", ALICE_TOKEN)
    github.add_user("bob", BOB_TOKEN)
    github.add_member("acme", "bob")
    return github


@pytest.fixture
def signin_settings(settings: Settings, acme: FakeGitHub) -> Settings:
    return replace(
        settings,
        auth_write=parse_grants("alice", "user"),
        auth_read=parse_grants("acme", "org"),
        github_url=acme.url,
        github_api_url=acme.api_url,
        oauth_client_id=acme.client_id,
        oauth_client_secret=acme.client_secret,
    )


@pytest.fixture
async def app_client(aiohttp_client: ClientFactory, signin_settings: Settings) -> ClientFactory:
    """A client of a fresh app with sign-in; keyword arguments override settings, and
    `cookie_jar` replaces the client's (an empty jar: a browser that keeps nothing)."""

    async def make(cookie_jar: AbstractCookieJar | None = None, **overrides: Any) -> Client:
        app = create_app(replace(signin_settings, **overrides))
        return await aiohttp_client(app, cookie_jar=cookie_jar)

    return make


@pytest.fixture
async def browser(app_client: ClientFactory) -> Client:
    return await app_client()


def set_cookies(resp: ClientResponse) -> dict[str, Morsel[str]]:
    """The cookies this answer sets, with their attributes, read from the raw headers."""
    found: dict[str, Morsel[str]] = {}
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        found.update(jar)
    return found


def cookie_header(*morsels: Morsel[str]) -> dict[str, str]:
    """A `Cookie` header sending these cookies as the server set them (quoted if it did)."""
    return {"Cookie": "; ".join(f"{m.key}={m.coded_value}" for m in morsels)}


async def authorize(location: str) -> URL:
    """The user clicks Authorize at the fake GitHub: where it sends the browser back."""
    async with aiohttp.ClientSession() as session, session.get(location, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return URL(resp.headers["Location"])


async def start_login(client: Client, next_: str | None = None) -> ClientResponse:
    resp = await client.get("/login", params={} if next_ is None else {"next": next_}, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    return resp


async def sign_in(client: Client, github: FakeGitHub, login: str, next_: str | None = None) -> ClientResponse:
    """The whole flow in `client`'s cookie jar, as `login`: the callback's answer."""
    github.approve_as = login
    callback = await authorize((await start_login(client, next_)).headers["Location"])
    resp = await client.get(callback.path_qs, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    return resp


async def me(client: Client, expect: int = 200, headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = await client.get("/me", headers=headers)
    assert resp.status == expect, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def refused(resp: ClientResponse, status: int) -> str:
    """Check the JSON error envelope with `status`; its message."""
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["ok"] is False and body["error"]["status"] == status
    message: str = body["error"]["message"]
    return message


async def audit(client: Client, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    resp = await client.get("/audit", headers=headers)
    assert resp.status == 200, await resp.text()
    entries: list[dict[str, Any]] = (await resp.json())["entries"]
    return entries


def origin(client: Client) -> str:
    return str(client.make_url("/").origin())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_whole_flow(browser: Client, acme: FakeGitHub, signin_settings: Settings) -> None:
    resp = await start_login(browser, "/tasks?page=2")
    location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == f"{acme.url}/login/oauth/authorize"
    query = location.query
    assert query["client_id"] == acme.client_id
    assert query["redirect_uri"] == str(browser.make_url("/login/callback"))
    assert query["scope"] == "read:org"
    assert len(query["state"]) >= 32
    state = set_cookies(resp)[STATE]
    assert state["httponly"] is True and state["samesite"] == "Lax" and not state["secure"]
    assert 0 < int(state["max-age"]) <= 900
    assert query["state"] not in state.value  # sealed: the cookie does not show it

    acme.approve_as = "alice"
    callback = await authorize(str(location))
    assert callback.path == "/login/callback" and callback.query["state"] == query["state"]
    resp = await browser.get(callback.path_qs, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    assert resp.headers["Location"] == "/tasks?page=2"
    cookies = set_cookies(resp)
    session = cookies[SESSION]
    assert session["httponly"] is True and session["samesite"] == "Lax" and not session["secure"]
    assert session["path"] == "/"
    assert int(session["max-age"]) == int(signin_settings.session_max_age)
    assert acme.count(EXCHANGE) == 1
    assert acme.issued_tokens[0] not in session.value  # encrypted: the GitHub token is not readable
    assert cookies[STATE].value == ""  # the state is spent: its cookie is emptied

    found = await me(browser)
    assert (found["login"], found["roles"], found["auth"]) == ("alice", ["read", "write"], True)
    assert isinstance(found["csrfToken"], str) and len(found["csrfToken"]) >= 32
    assert [e for e in await audit(browser) if e["action"] == "sign-in" and e["who"] == "alice"]


async def test_the_callback_refuses_a_wrong_missing_or_spent_state(browser: Client, acme: FakeGitHub) -> None:
    acme.approve_as = "alice"
    callback = await authorize((await start_login(browser)).headers["Location"])

    wrong = callback.update_query(state="x" * len(callback.query["state"]))
    resp = await browser.get(wrong.path_qs, allow_redirects=False)
    assert "does not match" in await refused(resp, 403)
    assert SESSION not in set_cookies(resp)

    browser.session.cookie_jar.clear()  # the state cookie is gone: another browser, or expired
    resp = await browser.get(callback.path_qs, allow_redirects=False)
    assert "missing or expired" in await refused(resp, 403)
    assert SESSION not in set_cookies(resp)
    assert acme.count(EXCHANGE) == 0  # GitHub was never asked for the code
    await me(browser, 401)

    # Replay: the same callback and state cookie once more, after a sign-in with them.
    login = await start_login(browser)
    state = set_cookies(login)[STATE]
    callback = await authorize(login.headers["Location"])
    resp = await browser.get(callback.path_qs, allow_redirects=False)
    assert resp.status == 302 and SESSION in set_cookies(resp)
    assert acme.count(EXCHANGE) == 1
    browser.session.cookie_jar.clear()
    resp = await browser.get(callback.path_qs, headers=cookie_header(state), allow_redirects=False)
    assert "already used" in await refused(resp, 403)
    assert SESSION not in set_cookies(resp)
    assert acme.count(EXCHANGE) == 1


@pytest.mark.parametrize(
    ("next_", "location"),
    [
        ("https://evil.example", "/"),
        ("//evil.example", "/"),
        ("/\\evil", "/"),
        ("/\\/evil.example", "/"),
        ("/\t/evil.example", "/"),
        ("/\x7f", "/"),  # no character a Location header cannot hold
        ("/tasks?page=2", "/tasks?page=2"),
    ],
)
async def test_next_stays_on_this_site(browser: Client, acme: FakeGitHub, next_: str, location: str) -> None:
    resp = await sign_in(browser, acme, "alice", next_)
    assert resp.headers["Location"] == location


async def test_signing_in_starts_a_new_session(app_client: ClientFactory, acme: FakeGitHub) -> None:
    browser = await app_client()
    bobs = set_cookies(await sign_in(browser, acme, "bob"))[SESSION]
    bob = await me(browser)
    assert bob["login"] == "bob"
    # The jar still holds bob's cookie: the callback receives it, and must not carry it on.
    alices = set_cookies(await sign_in(browser, acme, "alice"))[SESSION]
    assert alices.value != bobs.value
    alice = await me(browser)
    assert alice["login"] == "alice" and alice["csrfToken"] != bob["csrfToken"]
    # The old value is bob's session still, never alice's.
    other = await app_client(cookie_jar=aiohttp.DummyCookieJar())
    assert (await me(other, headers=cookie_header(bobs)))["login"] == "bob"
    assert (await me(other, headers=cookie_header(alices)))["login"] == "alice"


async def test_cookies_behind_an_https_public_url(app_client: ClientFactory, acme: FakeGitHub) -> None:
    public = "https://deploy.example.com"
    # The test talks plain http to the app: the cookies are sent by hand, as a browser would.
    client = await app_client(cookie_jar=aiohttp.DummyCookieJar(), public_url=public)
    resp = await start_login(client, "/apps")
    location = URL(resp.headers["Location"])
    assert location.query["redirect_uri"] == f"{public}/login/callback"
    state = set_cookies(resp)[SECURE_STATE]
    assert state["secure"] is True and state["httponly"] is True and STATE not in set_cookies(resp)
    acme.approve_as = "alice"
    callback = await authorize(str(location))
    assert str(callback.with_query(None)) == f"{public}/login/callback"
    resp = await client.get(callback.path_qs, headers=cookie_header(state), allow_redirects=False)
    assert resp.status == 302, await resp.text()
    assert resp.headers["Location"] == "/apps"
    cookies = set_cookies(resp)
    assert SESSION not in cookies
    session = cookies[SECURE_SESSION]
    assert session["secure"] is True and session["httponly"] is True and session["samesite"] == "Lax"
    assert session["path"] == "/" and not session["domain"]  # what __Host- requires
    found = await me(client, headers=cookie_header(session))
    assert found["login"] == "alice"
    # The origin is the public one, not the one the request came to.
    headers = {**cookie_header(session), "X-CSRF-Token": found["csrfToken"]}
    ok = {"action": "ok"}
    resp = await client.post("/shop/prod", json=ok, headers={**headers, "Origin": origin(client)})
    assert "cross-origin" in await refused(resp, 403)
    resp = await client.post("/shop/prod", json=ok, headers={**headers, "Origin": public})
    assert resp.status == 200, await resp.text()


async def test_logout_over_https_deletes_the_host_cookie(app_client: ClientFactory, acme: FakeGitHub) -> None:
    client = await app_client(cookie_jar=aiohttp.DummyCookieJar(), public_url="https://deploy.example.com")
    acme.approve_as = "alice"
    login = await start_login(client)
    callback = await authorize(login.headers["Location"])
    resp = await client.get(
        callback.path_qs, headers=cookie_header(set_cookies(login)[SECURE_STATE]), allow_redirects=False
    )
    session = set_cookies(resp)[SECURE_SESSION]
    resp = await client.post("/logout", headers=cookie_header(session))
    assert resp.status == 200, await resp.text()
    deleted = set_cookies(resp)[SECURE_SESSION]
    assert deleted.value == "" and deleted["path"] == "/" and not deleted["domain"]
    # A __Host- cookie is only set (here: emptied) by a Set-Cookie with Secure (RFC 6265bis 4.1.3.2).
    assert deleted["secure"] is True


async def test_cookies_over_real_tls(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path, acme: FakeGitHub
) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text(acme.client_secret + "\n")
    proc = start(
        "--ssl-key", str(SSL_DIR / "pulsar.local.key"), "--ssl-cert", str(SSL_DIR / "pulsar.local.crt"),
        "--auth-write", "alice", "--auth-read", "org:acme",
        "--github-url", acme.url, "--github-api-url", acme.api_url,
        "--oauth-client-id", acme.client_id, "--oauth-client-secret-file", str(secret),
    )  # fmt: skip
    # Blocking: the fake GitHub is not needed until the server listens.
    port = listening_port(tmp_path / "logs" / "pulsar-rest.log", proc, scheme="https")
    base = URL(f"https://localhost:{port}")
    ctx = ssl.create_default_context(cafile=str(SSL_DIR / "pulsar.local.crt"))
    acme.approve_as = "alice"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as browser:
        async with browser.get(base / "login", allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            location = resp.headers["Location"]
            assert set_cookies(resp)[SECURE_STATE]["secure"] is True
        assert URL(location).query["redirect_uri"] == str(base / "login" / "callback")
        callback = await authorize(location)
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            session = set_cookies(resp)[SECURE_SESSION]
        assert session["secure"] is True and session["path"] == "/" and not session["domain"]
        async with browser.get(base / "me") as resp:  # the jar sends it back over https
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["login"] == "alice"
    await asyncio.to_thread(stop, proc)  # the loop keeps serving the fake meanwhile


async def test_cookie_requests_need_post_origin_and_csrf(browser: Client, acme: FakeGitHub) -> None:
    await sign_in(browser, acme, "alice")
    csrf = (await me(browser))["csrfToken"]
    right = {"Origin": origin(browser), "X-CSRF-Token": csrf}
    body = {"action": "ok"}

    resp = await browser.post("/shop/prod", json=body, headers={"Origin": origin(browser)})
    assert "X-CSRF-Token" in await refused(resp, 403)
    resp = await browser.post("/shop/prod", json=body, headers={**right, "X-CSRF-Token": csrf[::-1]})
    assert "X-CSRF-Token" in await refused(resp, 403)
    resp = await browser.post("/shop/prod", json=body, headers={**right, "Origin": "https://evil.example"})
    assert "cross-origin" in await refused(resp, 403)
    resp = await browser.post("/shop/prod", json=body, headers={"X-CSRF-Token": csrf})
    assert "cross-origin" in await refused(resp, 403)
    resp = await browser.post("/shop/prod", json=body, headers=right)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["task"]["createdBy"] == "alice"

    resp = await browser.post("/app/staging", json={"action": "hang"}, headers=right)
    assert resp.status == 200, await resp.text()
    task_id = (await resp.json())["taskId"]
    await follow(browser, task_id, lambda t: "hanging" in t["output"])
    resp = await browser.get(f"/task/{task_id}/kill")
    assert "POST" in await refused(resp, 403)
    resp = await browser.get(f"/task/{task_id}")
    assert (await resp.json())["status"] == "running"  # the refused GET killed nothing
    resp = await browser.post(f"/task/{task_id}/kill", headers=right)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "killed"

    # An API client sends a token: neither Origin nor CSRF token is asked of it.
    browser.session.cookie_jar.clear()
    resp = await browser.post("/shop/staging", json=body, headers=bearer(ALICE_TOKEN))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["task"]["createdBy"] == "alice"


async def test_a_signed_in_websocket_of_this_origin_is_served(browser: Client, acme: FakeGitHub) -> None:
    await sign_in(browser, acme, "alice")
    async with browser.ws_connect("/websocket", headers={"Origin": origin(browser)}) as ws:
        resp = await browser.post("/shop/prod", json={"action": "ok"}, headers=bearer(ALICE_TOKEN))
        assert resp.status == 200, await resp.text()
        message = await ws.receive_json(timeout=10)
        assert message["event"] == "task.create"


async def test_a_signed_in_websocket_from_another_origin_is_refused(
    browser: Client, acme: FakeGitHub
) -> None:
    await sign_in(browser, acme, "alice")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await browser.ws_connect("/websocket", headers={"Origin": "https://evil.example.com"})
    assert caught.value.status == 403


async def test_logout(browser: Client, acme: FakeGitHub) -> None:
    await sign_in(browser, acme, "alice")
    assert (await me(browser))["login"] == "alice"
    resp = await browser.post("/logout")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["signedOut"] is True
    assert set_cookies(resp)[SESSION].value == ""  # the browser is told to drop it
    assert "not signed in" in await refused(await browser.get("/me"), 401)
    await refused(await browser.get("/tasks"), 401)
    entries = await audit(browser, bearer(ALICE_TOKEN))
    assert [e for e in entries if e["action"] == "sign-out" and e["who"] == "alice"]


async def test_the_made_session_key_is_private_and_survives_a_restart(
    app_client: ClientFactory, acme: FakeGitHub, signin_settings: Settings
) -> None:
    first = await app_client()
    key_file = signin_settings.data_dir / "session.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    session = set_cookies(await sign_in(first, acme, "alice"))[SESSION]
    second = await app_client(cookie_jar=aiohttp.DummyCookieJar())  # the app started again
    assert key_file.read_bytes() == key  # kept, not made again
    assert (await me(second, headers=cookie_header(session)))["login"] == "alice"


async def test_session_keys_rotate(app_client: ClientFactory, acme: FakeGitHub, tmp_path: Path) -> None:
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    only_b, both, only_a = tmp_path / "b.keys", tmp_path / "ab.keys", tmp_path / "a.keys"
    only_b.write_bytes(key_b + b"\n")
    both.write_bytes(key_a + b"\n" + key_b + b"\n")
    only_a.write_bytes(key_a + b"\n")

    old = set_cookies(await sign_in(await app_client(session_key_file=only_b), acme, "alice"))[SESSION]
    rotated = await app_client(session_key_file=both)
    assert (await me(rotated, headers=cookie_header(old)))["login"] == "alice"
    retired = await app_client(cookie_jar=aiohttp.DummyCookieJar(), session_key_file=only_a)
    await refused(await retired.get("/me", headers=cookie_header(old)), 401)
    # New sessions are made with the first key: the app that kept only A reads them.
    new = set_cookies(await sign_in(rotated, acme, "alice"))[SESSION]
    assert (await me(retired, headers=cookie_header(new)))["login"] == "alice"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not-a-key-but-a-secret-word\n", "key 1: not a session key"),
        (Fernet.generate_key() + b"\nsecond-line-secret\n", "key 2: not a session key"),
        (b"\n\n", "holds no session key"),
    ],
)
def test_a_malformed_key_file_is_one_line_without_its_content(
    signin_settings: Settings, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "session.keys"
    path.write_bytes(content)
    with pytest.raises(SignInSetupError) as caught:
        create_app(replace(signin_settings, session_key_file=path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and expected in message
    for line in content.split():
        assert line.decode() not in message


def test_a_missing_key_file(signin_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "none.keys"
    with pytest.raises(SignInSetupError, match=r"^cannot read the session keys .*none\.keys: "):
        create_app(replace(signin_settings, session_key_file=path))


async def test_without_oauth_settings_sign_in_is_404(app_client: ClientFactory) -> None:
    client = await app_client(oauth_client_id=None, oauth_client_secret=None)
    for method, path in (("GET", "/login"), ("GET", "/login/callback?code=c&state=s"), ("POST", "/logout")):
        message = await refused(await client.request(method, path, allow_redirects=False), 404)
        assert "--oauth-client-id" in message, message
    resp = await client.get("/me")
    await refused(resp, 401)
    assert SESSION not in set_cookies(resp)
    # Tokens still work.
    assert (await client.get("/tasks", headers=bearer(BOB_TOKEN))).status == 200


async def until_status(client: Client, path: str, status: int, deadline: float, **kwargs: Any) -> str:
    """GET `path` until it answers `status` (failing at the loop time `deadline`): its body."""
    loop = asyncio.get_running_loop()
    while True:
        resp = await client.get(path, **kwargs)
        if resp.status == status:
            return await resp.text()
        assert loop.time() < deadline, f"{path} still answers {resp.status}: {await resp.text()}"
        await asyncio.sleep(0.02)


async def test_a_removed_member_loses_access_within_the_cache_ttl(
    app_client: ClientFactory, acme: FakeGitHub
) -> None:
    ttl = 0.3
    browser = await app_client(auth_cache_ttl=ttl)
    await sign_in(browser, acme, "bob")
    api = await app_client(cookie_jar=aiohttp.DummyCookieJar(), auth_cache_ttl=ttl)
    assert (await browser.get("/tasks")).status == 200
    assert (await api.get("/tasks", headers=bearer(BOB_TOKEN))).status == 200
    acme.remove_member("acme", "bob")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ttl + 3.0  # the ttl, and room for a slow machine
    by_cookie = await until_status(browser, "/tasks", 403, deadline)
    by_token = await until_status(api, "/tasks", 403, deadline, headers=bearer(BOB_TOKEN))
    assert "bob has no read role" in by_cookie and "bob has no read role" in by_token
    # Still signed in, just without a role: /me says so.
    found = await me(browser)
    assert found["login"] == "bob" and found["roles"] == [] and "acme" in found["why"]


async def test_logout_from_another_origin_is_refused(browser: Client, acme: FakeGitHub) -> None:
    await sign_in(browser, acme, "alice")
    resp = await browser.post("/logout", headers={"Origin": "https://sibling.example"})
    assert "cross-origin" in await refused(resp, 403)
    assert (await me(browser))["login"] == "alice"  # still signed in
    assert (await browser.post("/logout", headers={"Origin": origin(browser)})).status == 200
    await me(browser, expect=401)


async def test_a_cookie_no_browser_of_ours_sent_is_no_session(app_client: ClientFactory) -> None:
    client = await app_client(cookie_jar=aiohttp.DummyCookieJar())
    # Bytes that are not UTF-8 in the session cookie (a sibling subdomain may plant one).
    headers = {"Cookie": "pulsar_session=\udcff".encode("utf-8", "surrogateescape").decode("latin-1")}
    assert (await client.get("/status", headers=headers)).status == 200
    assert (await client.get("/", headers=headers)).status == 200
    assert (await client.get("/tasks", headers=headers)).status == 401
