"""Create, read and list tasks: the documented shapes, the command line, the outcome."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pulsar_rest.confrepo import ConfigRepo, RepoUnavailable
from pulsar_rest.web.keys import SERVICE
from tests.conftest import Client, ClientFactory, create, eventually, finished, follow, get_json, release


async def test_create_answers_task_id_location_and_runs_pulsar(client: Client) -> None:
    resp = await client.post("/shop/production", json={"action": "ok"})
    assert resp.status == 200
    body = await resp.json()
    task_id = body["taskId"]
    assert isinstance(task_id, int)
    assert resp.headers["Location"].endswith(f"/task/{task_id}")
    assert body["task"]["status"] == "running"
    assert body["task"]["pid"] > 0

    task = await finished(client, task_id)
    assert task["status"] == "finished"
    assert task["exitCode"] == 0
    assert task["output"] == "Running ok for shop on production\nExecuted task ok for shop on production!\n"
    assert set(task) >= {
        "id", "status", "app", "env", "action", "exitCode", "output", "pid",
        "command", "createdAt", "startedAt", "finishedAt",
    }  # fmt: skip
    assert (task["app"], task["env"], task["action"]) == ("shop", "production", "ok")
    assert task["createdAt"] <= task["startedAt"] <= task["finishedAt"]


@pytest.mark.parametrize(
    "how",
    ["json-action", "json-task", "form-action", "form-task", "query-action", "query-task"],
)
async def test_task_name_from_json_form_or_query(client: Client, how: str) -> None:
    where, key = how.split("-")
    if where == "json":
        resp = await client.post("/shop/staging", json={key: "args[x]"})
    elif where == "form":
        resp = await client.post("/shop/staging", data={key: "args[x]"})
    else:
        resp = await client.post("/shop/staging", params={key: "args[x]"})
    assert resp.status == 200, await resp.text()
    task = await finished(client, (await resp.json())["taskId"])
    assert task["action"] == "args[x]"


async def test_command_is_an_argv_list_with_the_configuration_commit(
    make_client: ClientFactory, pulsar_bin: str, tmp_path: Path
) -> None:
    conf = tmp_path / "conf"
    (conf / "apps" / "app").mkdir(parents=True)
    (conf / "apps" / "app" / "prod.rb").write_text("")
    client = await make_client(config_repo=str(conf))
    task = await finished(client, (await create(client, "args[a,b=c/d@e+f]"))["id"])
    argv = json.loads(task["output"].splitlines()[0])
    # Each piece arrives whole, uninterpreted by any shell.
    assert argv == ["task", "app", "prod", "args[a,b=c/d@e+f]", "--conf-repo", str(conf)]
    assert task["command"] == [pulsar_bin, *argv]
    assert task["confCommit"] is None  # a plain directory has no commit


def test_secrets_in_a_repository_url_never_show(tmp_path: Path) -> None:
    repo = ConfigRepo("https://deployer:s3cret@127.0.0.1:9/conf.git", "master", tmp_path, timeout=20)
    with pytest.raises(RepoUnavailable) as caught:
        asyncio.run(repo.current())
    assert "s3cret" not in str(caught.value)
    assert "https://deployer:***@127.0.0.1:9/conf.git" in str(caught.value)


async def test_without_conf_repo_no_flag_is_passed(client: Client) -> None:
    task = await finished(client, (await create(client, "args"))["id"])
    assert json.loads(task["output"].splitlines()[0]) == ["task", "app", "prod", "args"]


async def test_non_zero_exit_is_failed(client: Client) -> None:
    task = await finished(client, (await create(client, "fail[7]"))["id"])
    assert task["status"] == "failed"
    assert task["exitCode"] == 7
    assert "cap aborted" in task["output"]


async def test_pulsar_failure_line_with_exit_zero_is_failed(client: Client) -> None:
    task = await finished(client, (await create(client, "pulsar-fail"))["id"])
    assert task["exitCode"] == 0
    assert task["status"] == "failed"


async def test_a_pulsar_that_cannot_start_fails_the_task_clearly(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-pulsar"
    broken.write_text("#!/no/such/interpreter\n")
    broken.chmod(0o755)
    client = await make_client(pulsar_bin=str(broken))
    resp = await client.post("/shop/prod", json={"action": "deploy"})
    assert resp.status == 200
    task = (await resp.json())["task"]
    assert task["status"] == "failed"
    assert task["pid"] is None
    assert "cannot start" in task["output"] and "broken-pulsar" in task["output"]


async def test_without_pulsar_nor_configuration_repository_tasks_are_refused(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await make_client(pulsar_bin=str(tmp_path / "no-such-pulsar"))
    resp = await client.post("/shop/prod", json={"action": "deploy"})
    assert resp.status == 503
    assert "--config-repo" in (await resp.json())["error"]["message"]


async def test_list_tasks_documented_shape(client: Client) -> None:
    first = await create(client, "ok")
    second = await create(client, "ok", app="blog", env="staging")
    resp = await client.get("/tasks")
    assert resp.status == 200
    body = await resp.json()
    assert body["url"] == str(client.make_url("/"))
    assert body["ids"] == [second["id"], first["id"]]  # newest first
    assert list(body["tasks"]) == [str(second["id"]), str(first["id"])]
    assert (body["total"], body["page"], body["pageSize"], body["pages"]) == (2, 1, 50, 1)
    assert body["tasks"][str(second["id"])]["app"] == "blog"


async def test_list_tasks_without_output(client: Client) -> None:
    done = await finished(client, (await create(client, "lines[100]"))["id"])
    full = (await get_json(client, "/tasks"))["tasks"][str(done["id"])]
    assert full["output"].startswith("line 1\nline 2\n")
    light = (await get_json(client, "/tasks", output="false"))["tasks"][str(done["id"])]
    assert "output" not in light and light["outputSize"] == full["outputSize"]
    assert {k: v for k, v in full.items() if k in light} == light
    answer = await get_json(client, "/tasks", 400, output="no")
    assert "output must be true or false" in answer["error"]["message"]


async def test_ids_are_unique_and_increasing(client: Client) -> None:
    ids = [(await create(client, "ok", app=f"app{i}"))["id"] for i in range(30)]
    assert ids == sorted(set(ids))
    for task_id in ids:
        await finished(client, task_id)


async def test_output_merges_stdout_and_stderr_in_order(client: Client) -> None:
    task = await finished(client, (await create(client, "interleave"))["id"])
    expected = "".join(f"{'out' if i % 2 else 'err'} {i}\n" for i in range(1, 21))
    assert task["output"] == expected


async def test_last_lines_after_exit_are_kept(client: Client) -> None:
    task = await finished(client, (await create(client, "lines[20000]"))["id"])
    lines = task["output"].splitlines()
    assert lines[0] == "line 1"
    assert lines[19999] == "line 20000"
    assert lines[-1] == "Executed task lines[20000] for app on prod!"


async def test_utf8_split_across_reads_and_invalid_bytes(client: Client, gates: Path) -> None:
    task_id = (await create(client, "utf8[cut]"))["id"]
    # The first read ends in the middle of "é": nothing of it may show yet.
    task = await follow(client, task_id, lambda t: t["output"].startswith("start"))
    assert task["output"] == "start "
    release(gates, "cut")
    task = await finished(client, task_id)
    assert task["output"] == "start é end\nbad \ufffd\ufffd bytes\n\ufffd"


async def test_running_task_shows_output_so_far(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[one]"))["id"]
    task = await follow(client, task_id, lambda t: "waiting for one" in t["output"])
    assert task["status"] == "running"
    assert task["finishedAt"] is None and task["exitCode"] is None
    release(gates, "one")
    task = await finished(client, task_id)
    assert task["status"] == "finished"
    assert task["output"].endswith(
        "passed one\nRunning gate[one] for app on prod\nExecuted task gate[one] for app on prod!\n"
    )


async def test_status_counts_tasks_and_waiters(client: Client, gates: Path) -> None:
    start = (await (await client.get("/status")).json())["seq"]
    task_id = (await create(client, "gate[st]"))["id"]
    await follow(client, task_id, lambda t: "waiting for st" in t["output"])
    body = await (await client.get("/status")).json()
    assert body["ok"] is True
    assert body["tasks"] == {"running": 1}
    assert body["waiters"] == 0 and body["seq"] == start + 2  # created, then running
    release(gates, "st")
    await finished(client, task_id)
    assert (await (await client.get("/status")).json())["tasks"] == {"finished": 1}


async def test_wait_answers_once_the_task_has_ended(client: Client) -> None:
    resp = await client.post("/app/prod", json={"action": "lines[3]", "wait": True})
    assert resp.status == 200
    task = (await resp.json())["task"]
    assert task["status"] == "finished" and task["output"].startswith("line 1\n")
    resp = await client.post("/app/prod", data={"action": "fail", "wait": "true"})
    assert resp.status == 200 and (await resp.json())["task"]["status"] == "failed"


async def test_wait_past_its_time_is_a_202_to_poll(client: Client, gates: Path) -> None:
    resp = await client.post("/app/prod", params={"timeout": "0.2"}, json={"action": "gate[w]", "wait": "1"})
    assert resp.status == 202
    body = await resp.json()
    assert body["task"]["status"] == "running"
    assert resp.headers["Location"].endswith(f"/task/{body['taskId']}")
    release(gates, "w")
    assert (await finished(client, body["taskId"]))["status"] == "finished"


async def test_wait_ends_with_a_kill(client: Client) -> None:
    waiting = asyncio.ensure_future(client.post("/app/prod", json={"action": "hang", "wait": True}))
    await eventually(lambda: client.app is not None and client.app[SERVICE].running == 1, what="the task")
    assert client.app is not None
    (task,) = [t for t in client.app[SERVICE].live() if t.status.going]
    assert (await client.post(f"/task/{task.id}/kill")).status == 200
    resp = await waiting
    assert resp.status == 200 and (await resp.json())["task"]["status"] == "killed"


async def test_urls_are_under_the_public_url_behind_a_proxy(make_client: ClientFactory) -> None:
    client = await make_client(public_url="https://deploy.example.com/pulsar")
    resp = await client.post("/app/prod", json={"action": "ok"})
    body = await resp.json()
    assert (
        body["url"] == resp.headers["Location"] == f"https://deploy.example.com/pulsar/task/{body['taskId']}"
    )
    assert (await get_json(client, "/tasks"))["url"] == "https://deploy.example.com/pulsar/"
    await finished(client, body["taskId"])
