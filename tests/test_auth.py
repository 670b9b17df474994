"""Authentication and roles: GitHub tokens, pulsar-rest tokens, the route table, denials."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest

from pulsar_rest.auth.grants import parse_grants
from pulsar_rest.settings import Settings
from tests.conftest import Client, ClientFactory
from tests.fake_github import FakeGitHub

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
