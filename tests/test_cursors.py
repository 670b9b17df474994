"""Following with cursors: nothing lost, nothing repeated, gone cursors said clearly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pulsar_rest import events
from pulsar_rest.web import views
from tests.conftest import (
    Client,
    ClientFactory,
    create,
    eventually,
    finished,
    follow,
    get_json,
    release,
    waiters,
)
from tests.stores import on_both_stores  # noqa: F401 (the fixture `settings` here)


async def _log(client: Client, task_id: int) -> bytes:
    resp = await client.get(f"/task/{task_id}/log")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    return await resp.read()


async def _seq(client: Client) -> int:
    """The server's current cursor: where a client starts following from."""
    seq: int = (await get_json(client, "/status"))["seq"]
    return seq


async def test_created_since_sees_every_task_of_a_burst(client: Client) -> None:
    start = (await get_json(client, "/tasks/created", since=await _seq(client), timeout=0))["seq"]
    ids = [t["id"] for t in await asyncio.gather(*(create(client, "ok", app=f"app{i}") for i in range(100)))]
    answer = await get_json(client, "/tasks/created", since=start)
    assert answer["changed"] is True and answer["more"] is False
    assert [t["id"] for t in answer["tasks"]] == sorted(ids)
    assert all("output" not in t for t in answer["tasks"])  # summaries: output is read by offset
    # Nothing new since the cursor: the poll waits, then says so with the same cursor.
    again = await get_json(client, "/tasks/created", since=answer["next"], timeout=0.05)
    assert again["changed"] is False and again["tasks"] == []
    assert again["next"] >= answer["next"]
    for task_id in ids:
        await finished(client, task_id)


async def test_created_since_waits_then_answers(client: Client) -> None:
    cursor = (await get_json(client, "/tasks/created", since=await _seq(client), timeout=0))["next"]
    poll = asyncio.create_task(get_json(client, "/tasks/created", since=cursor))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    task = await create(client, "ok")
    answer = await poll
    assert [t["id"] for t in answer["tasks"]] == [task["id"]]
    await finished(client, task["id"])


async def test_created_since_pages_a_large_burst(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "CREATED_LIMIT", 10)
    cursor = await _seq(client)
    ids = [(await create(client, "ok", app=f"app{i}"))["id"] for i in range(25)]
    seen: list[int] = []
    while True:
        answer = await get_json(client, "/tasks/created", since=cursor, timeout=0)
        seen += [t["id"] for t in answer["tasks"]]
        cursor = answer["next"]
        if not answer["more"]:
            break
    assert seen == ids
    for task_id in ids:
        await finished(client, task_id)


async def test_cursor_from_the_future_is_410(client: Client) -> None:
    body = await get_json(client, "/tasks/created", 410, since=await _seq(client) + 10**6)
    assert body["error"]["status"] == 410
    assert "ahead" in body["error"]["message"] and "list again" in body["error"]["message"]


async def test_cursor_from_before_this_run_is_410(client: Client) -> None:
    """Cursors are numbered from the run's own base: 0 (or a cursor of an earlier run) is
    older than any event kept, and the client must list again."""
    await finished(client, (await create(client, "ok"))["id"])
    body = await get_json(client, "/tasks/created", 410, since=0)
    assert "older than the events kept" in body["error"]["message"]
    assert "list again" in body["error"]["message"]


async def test_cursor_older_than_kept_is_410(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "KEEP_EVENTS", 5)
    client = await make_client()
    start = await _seq(client)
    ids = [(await create(client, "ok", app=f"app{i}"))["id"] for i in range(4)]
    for task_id in ids:
        await finished(client, task_id)  # 12 create and change events: 5 kept
    # The first event of this run was dropped: a cursor at it cannot be answered any more.
    body = await get_json(client, "/tasks/created", 410, since=start + 1)
    assert "older than the events kept" in body["error"]["message"]


async def test_output_offsets_read_everything_exactly_once(client: Client) -> None:
    task = await finished(client, (await create(client, "lines[5000]"))["id"])
    chunks: list[str] = []
    offset = 0
    while True:
        answer = await get_json(client, f"/task/{task['id']}/output", offset=offset, limit=1000)
        assert answer["offset"] == offset
        assert answer["nextOffset"] == offset + len(answer["output"].encode())
        assert answer["size"] == task["outputSize"]
        chunks.append(answer["output"])
        offset = answer["nextOffset"]
        if answer["complete"]:
            break
    assert len(chunks) > 30
    assert "".join(chunks).encode() == await _log(client, task["id"])


async def test_output_offset_follows_a_running_task_by_whole_lines(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[a,b]"))["id"]
    first = await get_json(client, f"/task/{task_id}/output", offset=0)
    assert first["output"] == "waiting for a\n"
    assert first["complete"] is False and first["task"]["status"] == "running"
    # Nothing after the cursor yet: it waits, and answers unchanged at the timeout.
    idle = await get_json(client, f"/task/{task_id}/output", offset=first["nextOffset"], timeout=0.05)
    assert idle["changed"] is False and idle["output"] == "" and idle["nextOffset"] == first["nextOffset"]
    poll = asyncio.create_task(get_json(client, f"/task/{task_id}/output", offset=first["nextOffset"]))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    release(gates, "a")
    second = await poll
    assert second["output"].startswith("passed a\n") and second["output"].endswith("\n")
    release(gates, "b")
    await finished(client, task_id)
    rest = await get_json(client, f"/task/{task_id}/output", offset=second["nextOffset"])
    assert rest["complete"] is True
    log = await _log(client, task_id)
    assert (first["output"] + second["output"] + rest["output"]).encode() == log


async def test_output_offset_holds_back_a_partial_line(client: Client, gates: Path) -> None:
    task_id = (await create(client, "utf8[cut]"))["id"]
    # "start " and half a character arrived, but no whole line: nothing to answer yet.
    answer = await get_json(client, f"/task/{task_id}/output", offset=0, timeout=0.1)
    assert answer["output"] == "" and answer["nextOffset"] == 0
    release(gates, "cut")
    await finished(client, task_id)
    answer = await get_json(client, f"/task/{task_id}/output", offset=0)
    assert answer["output"] == "start é end\nbad \ufffd\ufffd bytes\n\ufffd"
    assert answer["complete"] is True


async def test_output_answers_are_written_as_json_dumps_writes_them(client: Client, gates: Path) -> None:
    """Made from pieces (the output escaped once for all followers, the rest once per
    change of the task), an answer is byte for byte json.dumps's: old clients compare."""
    coloured = (await create(client, "pulsar_fail"))["id"]  # escape codes
    await finished(client, coloured)
    running = (await create(client, "utf8[json]", app="json"))["id"]
    await follow(client, running, lambda task: task["outputSize"] >= 6)  # "start " (half of "é" waits)
    fields = ["changed", "output", "offset", "nextOffset", "size", "complete", "task", "seq"]
    # "é" is bytes 6 and 7 of the log: offset 7 is inside it, as a client may ask.
    phases = [(coloured, (0, 7, 8)), (running, (0, 6)), (running, (0, 7, 8))]
    for phase, (task_id, offsets) in enumerate(phases):
        if phase == 2:
            release(gates, "json")
            await finished(client, running)
        for offset in offsets:
            query = {"offset": str(offset), "timeout": "0.1"}
            resp = await client.get(f"/task/{task_id}/output", params=query)
            raw = await resp.read()
            assert resp.status == 200, raw
            answer = json.loads(raw)
            assert raw == json.dumps(answer).encode() and list(answer) == fields
    assert answer["complete"] is True and answer["output"] == " end\nbad \ufffd\ufffd bytes\n\ufffd"


async def test_output_offset_past_the_end_is_410(client: Client) -> None:
    task = await finished(client, (await create(client, "ok"))["id"])
    body = await get_json(client, f"/task/{task['id']}/output", 410, offset=task["outputSize"] + 1)
    assert "past the end" in body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/task/1/output", "offset"),
        ("/task/1/output", "limit"),
        ("/task/1/state", "since"),
        ("/tasks/created", "since"),
    ],
)
@pytest.mark.parametrize("value", ["-1", "x", "1.5", "9" * 30])
async def test_bad_cursor_is_400(client: Client, path: str, param: str, value: str) -> None:
    await finished(client, (await create(client, "ok"))["id"])
    body = await get_json(client, path, 400, **{param: value})
    assert param in body["error"]["message"]


async def test_state_since_answers_each_change(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[s]"))["id"]
    running = await get_json(client, f"/task/{task_id}/state", since=0)
    assert running["changed"] is True and running["task"]["status"] == "running"
    idle = await get_json(client, f"/task/{task_id}/state", since=running["next"], timeout=0.05)
    assert idle["changed"] is False and idle["next"] == running["next"]
    poll = asyncio.create_task(get_json(client, f"/task/{task_id}/state", since=running["next"]))
    await eventually(lambda: waiters(client) == 1, what="the waiter")
    release(gates, "s")
    ended = await poll
    assert ended["changed"] is True and ended["task"]["status"] == "finished"
    assert ended["next"] > running["next"]


async def test_state_since_from_the_future_is_410(client: Client) -> None:
    task = await finished(client, (await create(client, "ok"))["id"])
    body = await get_json(client, f"/task/{task['id']}/state", 410, since=await _seq(client) + 10**6)
    assert "ahead" in body["error"]["message"]


async def test_task_output_is_capped_and_the_log_is_whole(client: Client) -> None:
    task = await finished(client, (await create(client, "lines[200000]"))["id"])
    log = await _log(client, task["id"])
    assert task["outputSize"] == len(log) > 2 * 1024 * 1024
    assert task["outputTruncated"] is True
    assert len(task["output"].encode()) <= 1024 * 1024
    assert task["output"].encode() == log[task["outputOffset"] :]
    small = await finished(client, (await create(client, "ok"))["id"])
    assert small["outputTruncated"] is False and small["outputOffset"] == 0


async def test_log_supports_range_reads(client: Client) -> None:
    task = await finished(client, (await create(client, "lines[1000]"))["id"])
    whole = await _log(client, task["id"])
    resp = await client.get(f"/task/{task['id']}/log", headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert await resp.read() == whole[100:200]


async def test_log_of_a_running_task_has_what_arrived(client: Client, gates: Path) -> None:
    task_id = (await create(client, "gate[l]"))["id"]
    await follow(client, task_id, lambda t: "waiting for l" in t["output"])
    assert await _log(client, task_id) == b"waiting for l\n"
    release(gates, "l")
    await finished(client, task_id)
