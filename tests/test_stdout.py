"""stdout kept apart on request (`stdout=true`), for clients that parse it: a chat bot looks
for the deployed revision there, without the noise of stderr."""

from __future__ import annotations

from typing import Any

import pytest

from pulsar_rest.settings import Settings
from tests.conftest import Client, ClientFactory, create, eventually, finished, get_json, post_json
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
