"""Kill: the whole process tree goes, whatever it does with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from pulsar_rest import runner
from pulsar_rest.web.keys import SERVICE
from tests.conftest import Client, ClientFactory, alive, create, eventually, finished, follow
from tests.stores import on_both_stores  # noqa: F401 (the fixture `settings` here)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_kill_running_task(client: Client, method: str) -> None:
    task = await create(client, "hang")
    await follow(client, task["id"], lambda t: "hanging" in t["output"])
    resp = await client.request(method, f"/task/{task['id']}/kill")
    assert resp.status == 200
    killed = await resp.json()
    assert killed["status"] == "killed"
    assert killed["signal"] == "SIGTERM"
    assert killed["killSignal"] == "SIGTERM"
    assert killed["exitCode"] is None
    assert killed["finishedAt"] is not None
    assert not alive(task["pid"])


async def test_a_task_that_exits_on_sigterm_shows_the_signal_it_was_sent(client: Client) -> None:
    # As cap does: it handles SIGTERM and exits 143 (128 + 15), so no signal ended it; the
    # client reads which one was sent without knowing the shell's convention.
    task = await create(client, "term-exit")
    await follow(client, task["id"], lambda t: "exits on SIGTERM" in t["output"])
    killed = await (await client.post(f"/task/{task['id']}/kill")).json()
    assert (killed["status"], killed["exitCode"], killed["signal"]) == ("killed", 143, None)
    assert killed["killSignal"] == "SIGTERM"
    finished_alone = await finished(client, (await create(client, "ok", env="staging"))["id"])
    assert finished_alone["killSignal"] is None


async def test_kill_escalates_to_sigkill_after_the_grace(client: Client) -> None:
    task = await create(client, "ignore-term")
    await follow(client, task["id"], lambda t: "ignoring SIGTERM" in t["output"])
    resp = await client.post(f"/task/{task['id']}/kill")
    assert resp.status == 200
    killed = await resp.json()
    assert killed["status"] == "killed"
    assert killed["signal"] == "SIGKILL"
    assert killed["killSignal"] == "SIGKILL"
    assert not alive(task["pid"])


async def test_kill_takes_the_grandchild_that_ignores_sigterm(client: Client) -> None:
    task = await create(client, "grandchild[gc.pid]")
    task = await follow(client, task["id"], lambda t: "grandchild" in t["output"])
    grandchild = int(task["output"].split()[1])
    assert psutil.Process(grandchild).ppid() == task["pid"]
    assert (await client.get(f"/task/{task['id']}/kill")).status == 200
    assert not alive(task["pid"])
    assert not alive(grandchild)


async def test_daemon_left_behind_is_stopped_with_its_task(client: Client, gates: Path) -> None:
    # It left the process group and its parent exited: only the run's marker finds it.
    task = await finished(client, (await create(client, "escape[daemon.pid]"))["id"])
    assert task["status"] == "finished"
    daemon = int(task["output"].split()[1])
    assert not alive(daemon)


async def test_kill_of_an_ended_task_is_a_409(client: Client) -> None:
    task = await finished(client, (await create(client, "ok"))["id"])
    resp = await client.post(f"/task/{task['id']}/kill")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["status"] == 409
    assert "already ended" in body["error"]["message"]
    assert (await (await client.get(f"/task/{task['id']}")).json())["status"] == "finished"


async def test_kill_of_an_unknown_task_is_a_404(client: Client) -> None:
    resp = await client.get("/task/999/kill")
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == "no task with id 999"


async def test_second_kill_while_stopping_answers_too(client: Client) -> None:
    task = await create(client, "ignore-term")
    await follow(client, task["id"], lambda t: "ignoring SIGTERM" in t["output"])
    answers = await asyncio.gather(
        client.post(f"/task/{task['id']}/kill"), client.post(f"/task/{task['id']}/kill")
    )
    assert [a.status for a in answers] == [200, 200]
    assert [(await a.json())["status"] for a in answers] == ["killed", "killed"]


async def test_server_shutdown_stops_running_tasks(make_client: ClientFactory) -> None:
    client = await make_client()
    task = await create(client, "ignore-term")
    await follow(client, task["id"], lambda t: "ignoring SIGTERM" in t["output"])
    await client.close()
    await eventually(lambda: not alive(task["pid"]), what="the task's process to go")


async def test_the_task_shows_who_asked_for_its_kill_at_once(make_client: ClientFactory) -> None:
    """`killedBy` is recorded before the status changes: an answer cached for the task as it
    was must not hide it while the task is still stopping."""
    client = await make_client(kill_grace=60)  # the task outlives the test's checks
    task = await create(client, "ignore-term")
    await follow(client, task["id"], lambda t: "ignoring SIGTERM" in t["output"])
    before = await (await client.get(f"/task/{task['id']}")).json()  # the answer is cached now
    assert before["killedBy"] is None
    assert client.app is not None
    stopping = await client.app[SERVICE].get(task["id"])
    killing = asyncio.create_task(client.post(f"/task/{task['id']}/kill"))
    try:
        await eventually(lambda: stopping.killed_by is not None, what="the kill request")
        during = await (await client.get(f"/task/{task['id']}")).json()
        assert (during["status"], during["killedBy"]) == ("running", "127.0.0.1")
    finally:
        os.kill(task["pid"], signal.SIGKILL)  # rather than wait out the grace
        resp = await killing
    assert resp.status == 200
    killed = await resp.json()
    assert (killed["status"], killed["killedBy"]) == ("killed", "127.0.0.1")


async def test_head_never_kills(client: Client) -> None:
    task = await create(client, "hang")
    await follow(client, task["id"], lambda t: "hanging" in t["output"])
    resp = await client.head(f"/task/{task['id']}/kill")
    assert resp.status == 405
    assert (await client.get(f"/task/{task['id']}")).status == 200
    assert alive(task["pid"])
    assert (await client.post(f"/task/{task['id']}/kill")).status == 200


async def test_a_daemon_is_found_below_the_server_without_a_look_through_every_process(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is its tasks' subreaper: a daemon that left the tree is adopted by it,
    and found by a walk of the server's own children, not by reading every process's
    environment (which took most of a short task's cost)."""

    def scan(markers: set[str]) -> dict[str, set[psutil.Process]]:
        raise AssertionError("every process's environment was read")

    assert runner.SUBREAPER.on
    monkeypatch.setattr(runner, "marked", scan)
    task = await finished(client, (await create(client, "escape[daemon.pid]"))["id"])
    assert task["status"] == "finished"
    daemon = int(task["output"].split()[1])
    assert not alive(daemon)


async def test_without_a_subreaper_the_daemon_is_found_by_its_marker(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner.SUBREAPER, "on", False)
    task = await finished(client, (await create(client, "escape[daemon.pid]"))["id"])
    daemon = int(task["output"].split()[1])
    assert psutil.Process(daemon).ppid() != task["pid"]  # it had left the tree
    assert not alive(daemon)


async def test_a_process_the_server_adopted_is_collected_once_it_has_exited(client: Client) -> None:
    task = await finished(client, (await create(client, "orphan"))["id"])
    assert task["status"] == "finished"
    orphan = int(task["output"].split()[1])

    def collected() -> bool:
        try:
            return psutil.Process(orphan).ppid() != os.getpid()  # its pid taken by another
        except psutil.NoSuchProcess:
            return True

    await eventually(collected, what="the server to collect the orphan's exit")


async def test_without_pidfds_a_thread_waits_for_the_leader(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux before 5.3 has no pidfd: a thread waits for each task's leader instead."""

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    task = await finished(client, (await create(client, "fail"))["id"])
    assert (task["status"], task["exitCode"]) == ("failed", 3)
