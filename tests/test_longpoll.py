"""The documented long-polls: wake-up, timeout, answers at once, and client disconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Client, ClientFactory, create, eventually, finished, follow, release, waiters
from tests.stores import on_both_stores  # noqa: F401 (the fixture `settings` here)


async def _poll(client: Client, path: str, **params: str) -> dict[str, Any]:
    resp = await client.get(path, params=params)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_tasks_created_wakes_on_creation(client: Client) -> None:
    poll = asyncio.create_task(_poll(client, "/tasks/created"))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    task = await create(client, "ok", app="shop")
    answer = await poll
    assert answer["changed"] is True
    assert answer["task"]["id"] == task["id"]
    assert answer["task"]["app"] == "shop"
    assert waiters(client) == 0
    await finished(client, task["id"])


async def test_tasks_created_times_out_unchanged(client: Client) -> None:
    assert await _poll(client, "/tasks/created", timeout="0.05") == {"changed": False}
    assert waiters(client) == 0


async def test_timeout_is_capped_by_the_configured_one(make_client: ClientFactory) -> None:
    client = await make_client(long_poll_timeout=0.1)
    # Asks for an hour, gets the server's 0.1 s (the test's own timeout would fail it otherwise).
    assert await _poll(client, "/tasks/created", timeout="3600") == {"changed": False}


async def test_output_wakes_on_new_output(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[a]"))["id"]
    await follow(client, task_id, lambda t: "waiting for a" in t["output"])
    poll = asyncio.create_task(_poll(client, f"/task/{task_id}/output"))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    release(gates, "a")
    answer = await poll
    assert answer["changed"] is True
    assert "passed a" in answer["task"]["output"]
    await finished(client, task_id)


async def test_output_wakes_on_state_change(client: Client) -> None:
    task_id = (await create(client, "hang"))["id"]
    await follow(client, task_id, lambda t: "hanging" in t["output"])
    poll = asyncio.create_task(_poll(client, f"/task/{task_id}/output"))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    assert (await client.post(f"/task/{task_id}/kill")).status == 200
    answer = await poll
    assert answer["changed"] is True
    assert answer["task"]["status"] in ("running", "killed")
    assert (await finished(client, task_id))["status"] == "killed"


async def test_output_answers_at_once_when_ended(client: Client) -> None:
    task_id = (await create(client, "ok"))["id"]
    await finished(client, task_id)
    answer = await _poll(client, f"/task/{task_id}/output")  # would wait 10 s otherwise
    assert answer["changed"] is True
    assert answer["task"]["status"] == "finished"
    assert waiters(client) == 0


async def test_output_times_out_unchanged(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[b]"))["id"]
    await follow(client, task_id, lambda t: "waiting for b" in t["output"])
    assert await _poll(client, f"/task/{task_id}/output", timeout="0.05") == {"changed": False}
    release(gates, "b")
    await finished(client, task_id)


async def test_state_waits_for_the_end_through_output(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[c,d]"))["id"]
    await follow(client, task_id, lambda t: "waiting for c" in t["output"])
    poll = asyncio.create_task(_poll(client, f"/task/{task_id}/state"))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    release(gates, "c")
    await follow(client, task_id, lambda t: "waiting for d" in t["output"])
    assert not poll.done()  # output is no state change
    release(gates, "d")
    answer = await poll
    assert answer["changed"] is True
    assert answer["task"]["status"] == "finished"
    assert answer["task"]["output"].endswith("!\n")


async def test_state_answers_at_once_when_ended_and_times_out(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[e]"))["id"]
    assert await _poll(client, f"/task/{task_id}/state", timeout="0.05") == {"changed": False}
    release(gates, "e")
    await finished(client, task_id)
    answer = await _poll(client, f"/task/{task_id}/state")
    assert answer["changed"] is True and answer["task"]["status"] == "finished"


@pytest.mark.parametrize("path", ["/tasks/created", "/task/{id}/output", "/task/{id}/state"])
async def test_client_disconnect_frees_the_waiter(client: Client, gates: Path, path: str) -> None:
    task_id = (await create(client, "gate[f]"))["id"]
    await follow(client, task_id, lambda t: "waiting for f" in t["output"])
    polls = [asyncio.create_task(client.get(path.format(id=task_id))) for _ in range(5)]
    await eventually(lambda: waiters(client) == 5, what="five waiters")
    for poll in polls:
        poll.cancel()
    await asyncio.gather(*polls, return_exceptions=True)
    # The server notices each dropped connection and frees its waiter, long before the
    # 10 s long-poll timeout.
    await eventually(lambda: waiters(client) == 0, timeout=5, what="the waiters to go")
    release(gates, "f")
    await finished(client, task_id)


async def test_many_waiters_all_answered_by_one_event(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[g]"))["id"]
    await follow(client, task_id, lambda t: "waiting for g" in t["output"])
    polls = [asyncio.create_task(_poll(client, f"/task/{task_id}/output")) for _ in range(50)]
    await eventually(lambda: waiters(client) == 50, what="fifty waiters")
    release(gates, "g")
    answers = await asyncio.gather(*polls)
    assert all(a["changed"] and "passed g" in a["task"]["output"] for a in answers)
    assert waiters(client) == 0
    await finished(client, task_id)


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", ""])
async def test_bad_timeout_is_a_400(client: Client, value: str) -> None:
    resp = await client.get("/tasks/created", params={"timeout": value})
    assert resp.status == 400
    assert "timeout" in (await resp.json())["error"]["message"]
