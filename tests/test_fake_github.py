"""The fake GitHub answers as the real one does, so the auth tests built on it mean something."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.fake_github import FakeGitHub, MakeGitHub, github, make_github

__all__ = ["github", "make_github"]  # the fixtures, used by name below


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(token: str, scheme: str = "token") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


async def get(
    session: aiohttp.ClientSession, url: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    """GET `url` (with `token` if any): the status and the JSON body (None when empty)."""
    headers = auth(token) if token else {}
    async with session.get(url, headers=headers, **kwargs) as resp:
        text = await resp.text()
        return resp.status, (await resp.json() if text else None)


async def test_user_by_token(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "t1")
    github.add_user("alice", "t2")
    for token, scheme in (("t1", "token"), ("t2", "Bearer")):
        async with session.get(f"{github.api_url}/user", headers=auth(token, scheme)) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert body["login"] == "alice" and body["type"] == "User" and isinstance(body["id"], int)
    github.revoke("t1")
    for bad in ("t1", "nope", None):
        status, body = await get(session, f"{github.api_url}/user", bad)
        assert status == 401 and body["message"] == "Bad credentials"
    assert (await get(session, f"{github.api_url}/user", "t2"))[0] == 200
    basic = {"Authorization": aiohttp.encode_basic_auth("alice", "t2")}  # a service account's way
    async with session.get(f"{github.api_url}/user", headers=basic) as resp:
        assert resp.status == 200
    assert github.count("/user") == 7
    assert github.requests[-2].authorization == "token t2"


async def test_org_membership(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "ta")
    github.add_user("bob", "tb")
    github.add_user("carol", "tc", scopes=set())
    github.add_member("acme", "alice")
    github.add_member("acme", "bob", state="pending")
    github.add_member("acme", "carol")
    url = f"{github.api_url}/user/memberships/orgs/acme"
    status, body = await get(session, url, "ta")
    assert status == 200
    assert body["state"] == "active" and body["role"] == "member"
    assert body["organization"]["login"] == "acme" and body["user"]["login"] == "alice"
    status, body = await get(session, url, "tb")
    assert (status, body["state"]) == (200, "pending")
    status, body = await get(session, f"{github.api_url}/user/memberships/orgs/other", "ta")
    assert (status, body["message"]) == (404, "Not Found")
    status, body = await get(session, url, "tc")
    assert status == 403 and "read:org" in body["message"]
    github.saml_orgs.add("acme")
    status, body = await get(session, url, "ta")
    assert status == 403 and "SAML enforcement" in body["message"]
    github.saml_authorized.add("ta")
    assert (await get(session, url, "ta"))[0] == 200
    github.saml_orgs.clear()
    github.remove_member("acme", "alice")
    assert (await get(session, url, "ta"))[0] == 404


async def test_org_members_check(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "ta")
    github.add_user("mallory", "tm")
    github.add_member("acme", "alice")
    github.add_member("acme", "bob")
    github.add_member("acme", "dave", state="pending")
    base = f"{github.api_url}/orgs/acme/members"
    assert await get(session, f"{base}/bob", "ta") == (204, None)
    assert (await get(session, f"{base}/dave", "ta"))[0] == 404
    assert (await get(session, f"{base}/nobody", "ta"))[0] == 404
    async with session.get(f"{base}/bob", headers=auth("tm"), allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{github.api_url}/orgs/acme/public_members/bob"


async def test_team_pagination_under_enterprise_prefix(
    make_github: MakeGitHub, session: aiohttp.ClientSession
) -> None:
    github = await make_github("/api/v3")
    assert github.api_url == github.url + "/api/v3"
    github.add_user("alice", "ta")
    github.add_teams("alice", "acme", 249)
    github.add_team("acme", "zz-wanted", ["alice"])  # sorts last: page 3 at per_page=100
    github.add_team("acme", "not-mine", ["bob"])
    url: str | None = f"{github.api_url}/user/teams?per_page=100"
    pages: list[list[dict[str, Any]]] = []
    while url:
        assert url.startswith(f"{github.api_url}/user/teams?")
        async with session.get(url, headers=auth("ta")) as resp:
            assert resp.status == 200
            pages.append(await resp.json())
            next_link = resp.links.get("next")
            url = str(next_link["url"]) if next_link else None
            if len(pages) == 1:
                assert URL(str(resp.links["last"]["url"])).query["page"] == "3"
            if len(pages) == 2:
                assert set(resp.links) == {"prev", "next", "last", "first"}
    assert [len(p) for p in pages] == [100, 100, 50]
    assert pages[2][-1]["slug"] == "zz-wanted"
    assert pages[2][-1]["organization"]["login"] == "acme"
    assert github.count("/api/v3/user/teams") == 3

    member = f"{github.api_url}/orgs/acme/teams/zz-wanted/memberships"
    status, body = await get(session, f"{member}/alice", "ta")
    assert (status, body["state"]) == (200, "active")
    assert (await get(session, f"{member}/bob", "ta"))[0] == 404
    github.remove_team_member("acme", "zz-wanted", "alice")
    assert (await get(session, f"{member}/alice", "ta"))[0] == 404
    assert (await get(session, f"{github.api_url}/no/such/path", "ta"))[0] == 404


async def test_one_page_has_no_link(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "ta")
    github.add_user("nos", "tn", scopes=set())
    github.add_teams("alice", "acme", 3)
    async with session.get(f"{github.api_url}/user/teams", headers=auth("ta")) as resp:
        assert resp.status == 200 and "Link" not in resp.headers
        assert [t["slug"] for t in await resp.json()] == ["team-0000", "team-0001", "team-0002"]
    assert (await get(session, f"{github.api_url}/user/teams", "tn"))[0] == 403
    github.add_team("sso-corp", "ops", ["alice"])
    github.saml_orgs.add("sso-corp")  # left out of the list, and GitHub says so
    async with session.get(f"{github.api_url}/user/teams", headers=auth("ta")) as resp:
        assert len(await resp.json()) == 3
        assert resp.headers["X-GitHub-SSO"].startswith("partial-results; organizations=")


async def test_oauth_web_flow(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    authorize = URL(f"{github.url}/login/oauth/authorize")
    callback = "http://service.test/auth/callback?next=%2Fhome"
    query = {"client_id": github.client_id, "redirect_uri": callback, "scope": "read:org", "state": "s t&1"}
    async with session.get(authorize.with_query(query | {"client_id": "wrong"})) as resp:
        assert resp.status == 404
    async with session.get(authorize.with_query(query)) as resp:
        assert resp.status == 200 and "Sign in to GitHub" in await resp.text()

    github.approve_as = "alice"
    async with session.get(authorize.with_query(query), allow_redirects=False) as resp:
        assert resp.status == 302
        back = URL(resp.headers["Location"])
    assert str(back.with_query(None)) == "http://service.test/auth/callback"
    assert back.query["state"] == "s t&1" and back.query["next"] == "/home"
    code = back.query["code"]
    github.approve_as = "bob"  # the code stays alice's

    token_url = f"{github.url}/login/oauth/access_token"
    form = {"client_id": github.client_id, "client_secret": "wrong", "code": code}
    async with session.post(token_url, data=form, headers={"Accept": "application/json"}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (200, "incorrect_client_credentials")
    form["client_secret"] = github.client_secret
    async with session.post(token_url, json=form, headers={"Accept": "application/json"}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["token_type"] == "bearer" and answer["scope"] == "read:org"
    assert github.issued_tokens == [answer["access_token"]]
    assert github.requests[-1].body == form
    status, user = await get(session, f"{github.api_url}/user", answer["access_token"])
    assert (status, user["login"]) == (200, "alice")

    async with session.post(token_url, data=form) as resp:  # reused, and no Accept: form-encoded
        assert resp.status == 200
        assert resp.content_type == "application/x-www-form-urlencoded"
        assert URL("?" + await resp.text()).query["error"] == "bad_verification_code"


async def test_error500_and_ratelimit(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "ta")
    github.mode = "error500"
    assert await get(session, f"{github.api_url}/user", "ta") == (500, {"message": "Server Error"})
    async with session.post(f"{github.url}/login/oauth/access_token", data={"code": "x"}) as resp:
        assert resp.status == 500
    github.mode = "ratelimit"
    async with session.get(f"{github.api_url}/user", headers=auth("ta")) as resp:
        assert resp.status == 403
        assert "rate limit exceeded" in (await resp.json())["message"]
        assert resp.headers["X-RateLimit-Limit"] == "5000"
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert 0 < int(resp.headers["X-RateLimit-Reset"]) - time.time() <= 61
    github.approve_as = "alice"  # the authorize page is never failed
    params = {"client_id": github.client_id, "redirect_uri": "http://x.test/cb"}
    async with session.get(f"{github.url}/login/oauth/authorize", params=params, allow_redirects=False) as r:
        assert r.status == 302
    github.mode = "ok"
    assert (await get(session, f"{github.api_url}/user", "ta"))[0] == 200
    with pytest.raises(ValueError):
        github.mode = "broken"


async def test_hang_until_released(github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    github.add_user("alice", "ta")
    github.mode = "hang"
    pending = asyncio.create_task(get(session, f"{github.api_url}/user", "ta"))
    await github.wait_hanging(1)
    assert not pending.done()
    github.release_hang()
    status, body = await pending
    assert (status, body["login"]) == (200, "alice")
    assert github.mode == "ok" and github.hanging == 0


async def test_hang_holds_until_timeout_and_stop(
    make_github: MakeGitHub, session: aiohttp.ClientSession
) -> None:
    github = await make_github()
    github.add_user("alice", "ta")
    github.mode = "hang"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await get(session, f"{github.api_url}/user", "ta")
    assert github.hanging == 1  # still held after the client gave up
    async with asyncio.timeout(2):
        await github.stop()  # lets it go rather than waiting out the shutdown timeout
    assert github.hanging == 0
