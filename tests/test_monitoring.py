"""Operators' endpoints: /health, /metrics, /host, /task/:id/processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pulsar_rest.auth.grants import Role
from pulsar_rest.store import TokenAdmin
from pulsar_rest.web.keys import SERVICE
from tests.conftest import (
    Client,
    ClientFactory,
    alive,
    create,
    eventually,
    finished,
    follow,
    get_json,
    waiters,
)
from tests.serving import ROOT, call, command, environ, listening_port, stop


async def test_health_is_ok_then_503_while_draining(client: Client) -> None:
    body = await get_json(client, "/health")
    assert body["ok"] is True
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "dataDir": True,
        "database": True,
        "accepting": True,
    }
    assert client.app is not None
    client.app[SERVICE].stop_accepting()  # the first step of a graceful stop
    resp = await client.get("/health")
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["message"] == "unhealthy: accepting (stopping)"
    assert body["checks"]["accepting"] == {"ok": False, "detail": "stopping"}


async def test_health_names_a_configuration_repository_that_cannot_be_fetched(
    make_client: ClientFactory, conf_git: Path
) -> None:
    client = await make_client(config_repo=str(conf_git), config_branch="deploy", config_fetch_interval=0)
    assert (await get_json(client, "/health"))["checks"]["configRepo"]["ok"] is True
    shutil.rmtree(conf_git)  # the repository is gone: the next fetch fails
    resp = await client.post("/example/staging", json={"action": "demo:progress"})
    assert resp.status == 503
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["checks"]["configRepo"] == {"ok": False, "detail": "the last fetch failed"}


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user `nobody` owns (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pulsar-rest-nobody-"))
    path.chmod(0o755)
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_health_says_when_the_data_directory_becomes_read_only(nobody_dir: Path, pulsar_bin: str) -> None:
    # As root, permissions do not stop a write: the server runs as nobody, as in production.
    shutil.copy(pulsar_bin, nobody_dir / "pulsar")
    data, log = nobody_dir / "data", nobody_dir / "logs" / "pulsar-rest.log"
    argv = command("--port", "0", "--data-dir", str(data), "--log-dir", str(log.parent))
    argv += ["--pulsar-bin", str(nobody_dir / "pulsar")]
    proc = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
        cwd=ROOT,
        env=environ(HOME=str(nobody_dir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{listening_port(log, proc)}"
        assert call(f"{base}/health")["ok"] is True
        data.chmod(0o555)
        with pytest.raises(urllib.error.HTTPError) as refused:
            call(f"{base}/health")
        assert refused.value.code == 503
        body = refused.value.read().decode()
        assert '"dataDir": {"ok": false, "detail": "not writable"}' in body
        data.chmod(0o755)
        assert call(f"{base}/health")["ok"] is True
    finally:
        data.chmod(0o755)
        if proc.poll() is None:
            stop(proc)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample `name` with `labels` (0 when there is none)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_metrics_move_when_a_task_runs(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=")
    before = await resp.text()
    task = await finished(client, (await create(client, "lines[10]"))["id"])
    failed = await finished(client, (await create(client, "fail", env="staging"))["id"])
    assert (task["status"], failed["status"]) == ("finished", "failed")
    after = await (await client.get("/metrics")).text()
    assert (
        metric(after, "pulsar_rest_tasks", status="finished")
        == metric(before, "pulsar_rest_tasks", status="finished") + 1
    )
    assert metric(after, "pulsar_rest_tasks_ended_total", status="failed") == 1
    assert (
        metric(after, "pulsar_rest_tasks_started_total")
        == metric(before, "pulsar_rest_tasks_started_total") + 2
    )
    assert metric(after, "pulsar_rest_task_duration_seconds_count", app="app", env="prod") == 1
    assert metric(after, "pulsar_rest_output_bytes_total") >= task["outputSize"] + failed["outputSize"]
    # Requests are counted by route template, never by raw path.
    assert (
        metric(after, "pulsar_rest_http_requests_total", route="/task/{id}", method="GET", status="200") >= 1
    )
    assert (
        metric(after, "pulsar_rest_http_requests_total", route="/{app}/{env}", method="POST", status="200")
        == 2
    )
    assert f'/task/{task["id"]}"' not in after
    assert metric(after, "pulsar_rest_http_requests_in_progress", route="/metrics") == 1  # this very scrape


async def test_waiting_long_polls_are_counted(client: Client) -> None:
    task = await create(client, "gate[g]")
    waiting = asyncio.ensure_future(client.get(f"/task/{task['id']}/state", params={"timeout": "5"}))
    await eventually(lambda: waiters(client) == 1, what="the long-poll to wait")
    text = await (await client.get("/metrics")).text()
    assert metric(text, "pulsar_rest_http_requests_in_progress", route="/task/{id}/state") == 1
    assert metric(text, "pulsar_rest_long_poll_waiters") == 1
    waiting.cancel()


def tokens(data_dir: Path) -> dict[Role, dict[str, str]]:
    admin = TokenAdmin(data_dir)
    try:
        return {role: {"Authorization": f"Bearer {admin.create(role.value, role, None)}"} for role in Role}
    finally:
        admin.close()


async def test_processes_of_a_running_task(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_PASSWORD", "inherited-pw")  # a secret-looking name the task inherits
    variables = {"RELEASE": "v1-s3cret", "API_KEY": "k3y"}
    resp = await client.post("/app/prod", json={"action": "grandchild[gc.pid]", "taskVariables": variables})
    assert resp.status == 200, await resp.text()
    task = await follow(client, (await resp.json())["task"]["id"], lambda t: "grandchild" in t["output"])
    grandchild = int(task["output"].split()[1])

    resp = await client.get(f"/task/{task['id']}/processes")
    assert resp.status == 200
    listed = {proc["pid"]: proc for proc in (await resp.json())["processes"]}
    assert task["pid"] in listed and grandchild in listed
    assert listed[grandchild]["ppid"] == task["pid"]
    assert os.getpid() not in listed  # the server's own never appear
    leader = listed[task["pid"]]
    assert leader["rss"] > 0 and leader["startedAt"].endswith("Z") and isinstance(leader["cmdline"], list)
    # The write role (anyone, without authentication) sees environments, secrets masked.
    assert leader["environ"]["RELEASE"] == "***" and leader["environ"]["API_KEY"] == "***"
    assert leader["environ"]["DEPLOY_PASSWORD"] == "***"
    assert leader["environ"]["PATH"] == os.environ["PATH"]
    text = await resp.text()
    assert "v1-s3cret" not in text and "k3y" not in text and "inherited-pw" not in text

    assert (await client.post(f"/task/{task['id']}/kill")).status == 200
    assert (await get_json(client, f"/task/{task['id']}/processes"))["processes"] == []
    assert not alive(grandchild)


async def test_processes_show_environments_to_the_write_role_only(
    make_client: ClientFactory, settings: Any
) -> None:
    client = await make_client(auth_provider="token")
    admin = TokenAdmin(settings.data_dir)
    headers = {role: {"Authorization": f"Bearer {admin.create(role.value, role, None)}"} for role in Role}
    admin.close()
    resp = await client.post("/app/prod", json={"action": "hang"}, headers=headers[Role.WRITE])
    task_id = (await resp.json())["task"]["id"]

    async def listed(role: Role) -> list[dict[str, Any]]:
        resp = await client.get(f"/task/{task_id}/processes", headers=headers[role])
        assert resp.status == 200
        found: list[dict[str, Any]] = (await resp.json())["processes"]
        return found

    assert await listed(Role.READ), "a running task has a process"  # its pid is known once created
    assert all("environ" not in proc for proc in await listed(Role.READ))
    assert all("environ" in proc for proc in await listed(Role.WRITE))
    assert (await client.get(f"/task/{task_id}/processes")).status == 401
    assert (await client.post(f"/task/{task_id}/kill", headers=headers[Role.WRITE])).status == 200


async def test_host_statistics(client: Client, settings: Any) -> None:
    body = await get_json(client, "/host")
    assert body["cpu"]["count"] == len(body["cpu"]["perCore"]) == psutil.cpu_count()
    assert 0 <= body["cpu"]["percent"] <= 100
    assert set(body["load"]) == {"1m", "5m", "15m"}
    assert body["memory"]["total"] == psutil.virtual_memory().total
    assert body["disk"]["path"] == str(settings.data_dir) and body["disk"]["free"] > 0
    assert (
        body["process"]["pid"] == os.getpid()
        and body["process"]["rss"] > 0
        and body["process"]["openFiles"] > 0
    )
    assert body["uptime"] > 0
