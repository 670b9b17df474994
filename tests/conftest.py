"""Shared fixtures: the real app factory with the fake pulsar, and condition waits."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from pulsar_rest.settings import Settings
from pulsar_rest.web.app import create_app
from pulsar_rest.web.keys import BUS
from tests.fake_github import github, make_github  # noqa: F401 (fixtures for every test module)
from tests.postgres import Cluster, Missing, server_bin
from tests.serving import ROOT, TIMEOUT, command, environ

FAKE_PULSAR = Path(__file__).with_name("fake_pulsar.py")
DEMO = ROOT / "config" / "demo"  # the demo configuration repository

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def gates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory where the fake pulsar looks for gate files (inherited by tasks)."""
    path = tmp_path / "gates"
    path.mkdir()
    monkeypatch.setenv("FAKE_PULSAR_DIR", str(path))
    return path


@pytest.fixture
def pulsar_bin(tmp_path: Path) -> str:
    """An executable that runs the fake pulsar with this interpreter."""
    wrapper = tmp_path / "pulsar"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_PULSAR}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


@pytest.fixture
def settings(pulsar_bin: str, gates: Path, tmp_path: Path) -> Settings:
    return Settings(pulsar_bin=pulsar_bin, kill_grace=0.5, long_poll_timeout=10, data_dir=tmp_path / "data")


@pytest.fixture
async def make_client(aiohttp_client: ClientFactory, settings: Settings) -> ClientFactory:
    """A client of a fresh app; keyword arguments override settings."""

    async def make(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(replace(settings, **overrides)))

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    return await make_client()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until `predicate()` holds, failing after `timeout`: a condition, not a clock."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def create(client: Client, action: str, app: str = "app", env: str = "prod") -> dict[str, Any]:
    resp = await client.post(f"/{app}/{env}", json={"action": action})
    assert resp.status == 200, await resp.text()
    task: dict[str, Any] = (await resp.json())["task"]
    return task


async def get_json(client: Client, path: str, expect: int = 200, **params: Any) -> dict[str, Any]:
    """GET `path` with `params` (as strings), check the status, answer the JSON body."""
    resp = await client.get(path, params={k: str(v) for k, v in params.items()})
    assert resp.status == expect, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def post_json(client: Client, path: str, expect: int = 200, **body: Any) -> dict[str, Any]:
    """POST `body` as JSON to `path`, check the status, answer the JSON body."""
    resp = await client.post(path, json=body)
    assert resp.status == expect, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def follow(
    client: Client, task_id: int, until: Callable[[dict[str, Any]], bool], timeout: float = 15.0
) -> dict[str, Any]:
    """Read the task until `until(task)` holds, waiting in between for new output from
    where the last read ended (a cursor: nothing written in between is missed) or for the
    task's end; a status change without output is seen within a second. With a deadline."""
    async with asyncio.timeout(timeout):
        while True:
            task: dict[str, Any] = await get_json(client, f"/task/{task_id}")
            if until(task):
                return task
            await get_json(client, f"/task/{task_id}/output", offset=task["outputSize"], timeout=1)


async def finished(client: Client, task_id: int) -> dict[str, Any]:
    return await follow(client, task_id, lambda t: t["status"] not in ("queued", "created", "running"))


def release(gates: Path, name: str) -> None:
    (gates / name).touch()


def waiters(client: Client) -> int:
    return client.app[BUS].waiter_count if client.app else -1


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test leaves no process of its own behind."""
    yield
    me = psutil.Process(os.getpid())
    left = [p for p in me.children(recursive=True) if alive(p.pid)]
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def start(tmp_path: Path, pulsar_bin: str) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start pulsar-rest with the fake pulsar and a log dir; every process is reaped at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        logs, data = str(tmp_path / "logs"), str(tmp_path / "data")
        argv = command(
            "--port", "0", "--pulsar-bin", pulsar_bin, "--log-dir", logs, "--data-dir", data, *args
        )
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # after a failure: SIGTERM first, so the server stops its tasks too
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` (as a committer of its own); its output."""
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.fixture
def conf_git(tmp_path: Path) -> Path:
    """A git copy of the demo repository, on branch `deploy` (not master)."""
    repo = tmp_path / "conf-src"
    shutil.copytree(DEMO, repo)
    git(repo, "init", "-q", "-b", "deploy")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "demo")
    return repo


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """Where a test's history lives: SQLite in the data directory (None), or a database of
    its own in the session's PostgreSQL (settings.database)."""
    if request.param == "sqlite":
        return None
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (tests/postgres.py), started when a test first asks for
    it and stopped at the session's end; a skip without PostgreSQL's server (a failure in CI:
    .ci/run installs it)."""
    try:
        bindir = server_bin()
    except Missing as missing:
        message = f"{missing}: the PostgreSQL tests need it"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true, so this is a failure")
        pytest.skip(message)
    cluster = Cluster(bindir)
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_dsn(postgres_cluster: Cluster) -> Iterator[str]:
    """The DSN of a fresh, empty database of the session's cluster, dropped after the test."""
    dsn = postgres_cluster.new_database()
    yield dsn
    postgres_cluster.drop_database(dsn)
