"""One deploy per app and environment: 409 or a queue; a global limit answers 503."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest

from pulsar_rest import runner
from pulsar_rest.output import OutputLog
from pulsar_rest.settings import Settings
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
    post_json,
    release,
)
from tests.stores import on_both_stores  # noqa: F401 (the fixture `settings` here)


async def test_a_second_deploy_of_the_same_app_and_env_is_a_409(client: Client, gates: Path) -> None:
    first = await create(client, "gate[one]", app="shop", env="prod")
    busy = await post_json(client, "/shop/prod", 409, action="deploy")
    assert busy["error"]["taskId"] == first["id"]
    assert f"busy with task {first['id']}" in busy["error"]["message"]
    assert "queue=true" in busy["error"]["message"]
    # Another environment, or another app, is no conflict.
    other_env = await create(client, "ok", app="shop", env="staging")
    other_app = await create(client, "ok", app="blog", env="prod")
    assert (await (await client.get("/tasks")).json())["total"] == 3
    release(gates, "one")
    for task in (first, other_env, other_app):
        assert (await finished(client, task["id"]))["status"] == "finished"
    # Once the deploy has ended, the next one starts.
    assert (await create(client, "ok", app="shop", env="prod"))["status"] == "running"


async def test_queued_deploys_run_one_after_the_other_in_order(client: Client, gates: Path) -> None:
    first = await create(client, "gate[q1]", app="shop", env="prod")
    second = (await post_json(client, "/shop/prod", 200, action="gate[q2]", queue=True))["task"]
    third = (await post_json(client, "/shop/prod?queue=true", 200, action="ok"))["task"]
    assert (second["status"], third["status"]) == ("queued", "queued")
    assert second["pid"] is None and second["startedAt"] is None
    release(gates, "q1")
    await finished(client, first["id"])
    running = await follow(client, second["id"], lambda t: "waiting for q2" in t["output"])
    assert running["status"] == "running"
    assert (await (await client.get(f"/task/{third['id']}")).json())["status"] == "queued"
    release(gates, "q2")
    done = [await finished(client, t["id"]) for t in (second, third)]
    assert [t["status"] for t in done] == ["finished", "finished"]
    assert first["startedAt"] <= done[0]["startedAt"] <= done[1]["startedAt"]
    assert done[0]["finishedAt"] <= done[1]["startedAt"]  # never at the same time


async def test_a_queued_task_can_be_killed_before_it_starts(client: Client, gates: Path) -> None:
    first = await create(client, "gate[k1]", app="shop", env="prod")
    doomed = (await post_json(client, "/shop/prod", 200, action="ok", queue="true"))["task"]
    after = (await post_json(client, "/shop/prod", 200, action="ok", queue="true"))["task"]
    killed = await (await client.post(f"/task/{doomed['id']}/kill")).json()
    assert (killed["status"], killed["pid"], killed["startedAt"]) == ("killed", None, None)
    assert killed["killedBy"] == "127.0.0.1"
    release(gates, "k1")
    await finished(client, first["id"])
    assert (await finished(client, after["id"]))["status"] == "finished"
    assert (await (await client.get(f"/task/{doomed['id']}")).json())["startedAt"] is None


async def test_max_running_answers_503_beyond_it(make_client: ClientFactory, gates: Path) -> None:
    client = await make_client(max_running=1)
    first = await create(client, "gate[m]", app="shop")
    refused = await post_json(client, "/blog/prod", 503, action="ok")
    assert "--max-running" in refused["error"]["message"]
    # Queuing behind a deploy of the same app and environment is still possible.
    queued = (await post_json(client, "/shop/prod", 200, action="ok", queue=True))["task"]
    release(gates, "m")
    await finished(client, first["id"])
    await finished(client, queued["id"])
    assert (await create(client, "ok", app="blog"))["status"] == "running"


async def test_bad_queue_value_is_a_400(client: Client) -> None:
    answer = await post_json(client, "/shop/prod", 400, action="ok", queue="soon")
    assert "queue must be true or false" in answer["error"]["message"]


async def test_a_shutdown_kills_queued_tasks_too_and_starts_none(
    make_client: ClientFactory, gates: Path
) -> None:
    client = await make_client()
    first = await create(client, "gate[r]", app="shop")
    queued = (await post_json(client, "/shop/prod", 200, action="ok", queue=True))["task"]
    await client.close()  # the running one is killed; the queued one never starts
    again = await make_client()
    statuses = [(await (await again.get(f"/task/{task['id']}")).json())["status"] for task in (first, queued)]
    assert statuses == ["killed", "killed"]
    never = await (await again.get(f"/task/{queued['id']}")).json()
    assert (never["startedAt"], never["killedBy"]) == (None, "shutdown")


async def test_a_kill_while_the_next_task_starts_starts_nothing_twice(client: Client, gates: Path) -> None:
    first = await create(client, "gate[s1]", app="shop")
    second = (await post_json(client, "/shop/prod", 200, action="gate[s2]", queue=True))["task"]
    third = (await post_json(client, "/shop/prod", 200, action="ok", queue=True))["task"]
    release(gates, "s1")
    await finished(client, first["id"])
    # The second is starting; the third, still queued, is killed meanwhile.
    assert (await (await client.post(f"/task/{third['id']}/kill")).json())["status"] == "killed"
    started = await follow(client, second["id"], lambda t: "waiting for s2" in t["output"])
    release(gates, "s2")
    done = await finished(client, second["id"])
    assert done["status"] == "finished" and done["pid"] == started["pid"]
    assert done["output"].count("waiting for s2") == 1  # one process, started once
    assert len([p for p in psutil.Process().children(recursive=True) if alive(p.pid)]) == 0


async def test_a_queued_task_holds_no_log_file(client: Client, gates: Path, settings: Settings) -> None:
    first = await create(client, "gate[f]", app="shop")
    await follow(client, first["id"], lambda t: "waiting for f" in t["output"])
    queued = [(await post_json(client, "/shop/prod", 200, action="ok", queue=True))["task"] for _ in range(3)]
    logs = settings.data_dir / "logs"
    assert (logs / f"{first['id']}.log").exists()
    assert not any((logs / f"{task['id']}.log").exists() for task in queued)
    await client.post(f"/task/{queued[0]['id']}/kill")
    resp = await client.get(f"/task/{queued[0]['id']}/log")  # no output, no file: empty
    assert (resp.status, await resp.text()) == (200, "")
    release(gates, "f")
    for task in queued[1:]:
        assert (await finished(client, task["id"]))["status"] == "finished"
        assert "Executed task ok" in (logs / f"{task['id']}.log").read_text()


async def test_a_task_that_cannot_be_started_fails_and_frees_its_app(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError("an unforeseen failure")  # not a SpawnError

    with monkeypatch.context() as patch:
        patch.setattr(runner, "spawn", broken)
        failed = await post_json(client, "/shop/prod", 200, action="ok")
    task = await finished(client, failed["taskId"])
    assert task["status"] == "failed"
    assert "could not be started: see the server log" in task["output"]
    assert (await finished(client, (await create(client, "ok", app="shop"))["id"]))["status"] == "finished"


async def test_a_queued_task_killed_as_the_one_before_ends_never_starts(
    client: Client, gates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.app is not None
    service = client.app[SERVICE]
    first = await create(client, "gate[h]", app="shop")
    await follow(client, first["id"], lambda t: "waiting for h" in t["output"])
    doomed = (await post_json(client, "/shop/prod", action="gate[never]", queue=True))["task"]
    after = (await post_json(client, "/shop/prod", action="ok", queue=True))["task"]
    # A slow disk: the log writer's one thread is held, so both ends below wait on it, and
    # the first task ends while the kill of the next one is under way.
    disk = threading.Event()
    closing: list[OutputLog] = []
    real_close = OutputLog.close

    async def held_close(self: OutputLog) -> int:
        closing.append(self)
        await asyncio.to_thread(disk.wait)
        return await real_close(self)

    monkeypatch.setattr(OutputLog, "close", held_close)
    holder, killed = await service.get(first["id"]), await service.get(doomed["id"])
    release(gates, "h")
    await eventually(lambda: holder.output in closing, what="the first task to be ending")
    kill = asyncio.ensure_future(client.post(f"/task/{doomed['id']}/kill"))
    await eventually(lambda: killed.output in closing, what="the kill to be under way")
    disk.set()
    assert (await (await kill).json())["status"] == "killed"
    assert (await finished(client, after["id"]))["status"] == "finished"
    never = await get_json(client, f"/task/{doomed['id']}")
    assert (never["status"], never["pid"], never["outputSize"]) == ("killed", None, 0)
    await eventually(lambda: not any(alive(p.pid) for p in psutil.Process().children(recursive=True)))


async def test_a_create_whose_client_leaves_while_it_is_recorded_is_made_whole(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller of a create goes away (its client left) while the task is being written:
    the task is made all the same and runs, so it never holds its app and env without being
    run (with a shared store, a row no instance runs would block every instance)."""
    service = client.app[SERVICE]
    store = service._store
    recorded = asyncio.Event()
    add = store.add

    async def add_and_tell(task: Any) -> None:
        recorded.set()
        await add(task)

    monkeypatch.setattr(store, "add", add_and_tell)
    creating = asyncio.ensure_future(service.create("shop", "prod", "ok"))
    await recorded.wait()
    creating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await creating
    monkeypatch.undo()
    listed = await get_json(client, "/tasks", output="false")
    (left,) = listed["tasks"].values()
    assert (await finished(client, left["id"]))["status"] == "finished"
    # Nothing holds shop/prod: the next deploy of it runs.
    after = await create(client, "ok", app="shop", env="prod")
    assert (await finished(client, after["id"]))["status"] == "finished"
