"""stdout kept apart on request (`stdout=true`), for clients that parse it: a chat bot looks
for the deployed revision there, without the noise of stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pulsar_rest.settings import Settings
from tests.conftest import (
    Client,
    ClientFactory,
    create,
    eventually,
    finished,
    follow,
    get_json,
    post_json,
    release,
)
from tests.test_errors import assert_envelope

OUT = [f"out {i}\n" for i in range(1, 21, 2)]
ERR = [f"err {i}\n" for i in range(2, 21, 2)]


async def _run_apart(client: Client, action: str = "interleave") -> dict[str, Any]:
    """Run a task with its stdout kept apart, until it has ended."""
    return await finished(
        client, (await post_json(client, "/app/prod", action=action, stdout=True))["taskId"]
    )


def _in_order(lines: list[str], within: list[str]) -> bool:
    """Whether `lines` appear in `within` in this order (a subsequence)."""
    rest = iter(within)
    return all(line in rest for line in lines)


@pytest.mark.parametrize("how", ["json", "form", "query"])
async def test_stdout_is_kept_apart_and_the_output_still_has_both(client: Client, how: str) -> None:
    if how == "json":
        answer = await post_json(client, "/app/prod", action="interleave", stdout=True)
    elif how == "form":
        resp = await client.post("/app/prod", data={"action": "interleave", "stdout": "1"})
        assert resp.status == 200
        answer = await resp.json()
    else:
        resp = await client.post("/app/prod?action=interleave&stdout=true")
        assert resp.status == 200
        answer = await resp.json()
    task = await finished(client, answer["taskId"])
    stdout = await (await client.get(f"/task/{task['id']}/stdout")).text()
    assert stdout == "".join(OUT)
    assert task["stdoutSize"] == len(stdout.encode())
    merged = (await (await client.get(f"/task/{task['id']}/log")).text()).splitlines(keepends=True)
    # Read from two pipes, each stream keeps its order; between them, the order of arrival.
    assert sorted(merged) == sorted(OUT + ERR)
    assert _in_order(OUT, merged) and _in_order(ERR, merged)


async def test_without_asking_there_is_no_stdout_of_its_own(client: Client) -> None:
    task = await finished(client, (await create(client, "interleave"))["id"])
    assert task["stdoutSize"] is None
    # Merged at one pipe: the order in which they were written.
    assert task["output"] == "".join(f"{'out' if i % 2 else 'err'} {i}\n" for i in range(1, 21))
    resp = await client.get(f"/task/{task['id']}/stdout")
    assert resp.status == 404
    body = await resp.json()
    assert_envelope(body, 404)
    assert "create a task with stdout=true" in body["error"]["message"]


async def test_a_bad_stdout_value_is_a_400(client: Client) -> None:
    answer = await post_json(client, "/app/prod", 400, action="ok", stdout="maybe")
    assert "stdout must be true or false" in answer["error"]["message"]
    assert (await get_json(client, "/tasks"))["total"] == 0


async def test_stdout_reads_by_range_and_is_empty_before_the_first_byte(client: Client) -> None:
    task = await finished(
        client, (await post_json(client, "/app/prod", action="interleave", stdout=True))["taskId"]
    )
    part = await client.get(f"/task/{task['id']}/stdout", headers={"Range": "bytes=6-11"})
    assert (part.status, await part.text()) == (206, "out 3\n")
    quiet = await post_json(client, "/app/prod", action="ok", stdout=True, queue=True)
    assert quiet["task"]["stdoutSize"] is not None
    resp = await client.get(f"/task/{quiet['taskId']}/stdout")
    assert resp.status == 200
    await finished(client, quiet["taskId"])


async def test_stdout_survives_a_restart_and_goes_with_its_task(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client()
    kept = await finished(
        client, (await post_json(client, "/app/prod", action="interleave", stdout=True))["taskId"]
    )
    await client.close()

    again = await make_client(retain_tasks=1)
    assert (await get_json(again, f"/task/{kept['id']}"))["stdoutSize"] == kept["stdoutSize"]
    assert await (await again.get(f"/task/{kept['id']}/stdout")).text() == "".join(OUT)
    logs = settings.data_dir / "logs"
    assert (logs / f"{kept['id']}.stdout.log").is_file()
    await finished(again, (await create(again, "ok", app="other"))["id"])  # the newer one stays
    await eventually(lambda: not (logs / f"{kept['id']}.stdout.log").exists(), what="the pruning")
    assert not (logs / f"{kept['id']}.log").exists()


async def test_a_character_cut_on_one_stream_stays_whole_in_the_output(client: Client, gates: Path) -> None:
    task_id = (await post_json(client, "/app/prod", action="split[s1,s2]", stdout=True))["taskId"]
    await follow(client, task_id, lambda t: t["output"] == "start ")  # "é" is half written
    release(gates, "s1")
    await follow(client, task_id, lambda t: t["output"] == "start E\n")  # stderr, in between
    release(gates, "s2")
    task = await finished(client, task_id)
    assert task["output"] == "start E\né end\n"  # each stream decoded on its own
    assert await (await client.get(f"/task/{task_id}/stdout")).text() == "start é end\n"


async def test_a_new_task_never_shows_a_stale_log_of_its_id(
    make_client: ClientFactory, settings: Settings, gates: Path
) -> None:
    # A history moved away without its logs: the ids start again, the old files are there.
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True)
    for name in ("1.log", "2.log", "2.stdout.log"):
        (logs / name).write_text("an older task's output\n")
    client = await make_client()
    holder = await create(client, "gate[h]")
    queued = await post_json(client, "/app/prod", action="ok", queue=True, stdout=True)
    killed = await (await client.post(f"/task/{queued['taskId']}/kill")).json()
    assert (killed["status"], killed["outputSize"], killed["stdoutSize"]) == ("killed", 0, 0)
    for route in ("log", "stdout"):
        assert await (await client.get(f"/task/{queued['taskId']}/{route}")).text() == ""
    release(gates, "h")
    assert "older" not in (await finished(client, holder["id"]))["output"]
    await client.close()
    again = await get_json(await make_client(), f"/task/{queued['taskId']}")
    assert (again["outputSize"], again["stdoutSize"]) == (0, 0)
