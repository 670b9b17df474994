"""Several instances on one PostgreSQL, as real processes: a task made through one is seen,
followed with the same cursors, and killed through another; a restart keeps the cursors."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import alive
from tests.nginx import CERT, free_port, nginx_running, site_on_loopback, substitute
from tests.serving import OPENER, TIMEOUT, call, ended, listening_port, stop, wait_for

Start = Callable[..., subprocess.Popen[str]]


def instance(
    start: Start, tmp_path: Path, name: str, dsn: str, run: int = 1
) -> tuple[subprocess.Popen[str], str]:
    """A server of its own data directory (a log for each run) on the shared database; its
    base URL."""
    logs = tmp_path / name / f"logs-{run}"
    # --shutdown-grace 0: its stop at the end of a test (a failed one too) stops its tasks at once.
    data = str(tmp_path / name / "data")
    proc = start("--database", dsn, "--data-dir", data, "--log-dir", str(logs), "--shutdown-grace", "0")
    return proc, f"http://127.0.0.1:{listening_port(logs / 'pulsar-rest.log', proc)}"


def test_a_task_of_one_instance_is_followed_and_killed_through_another(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    _, a = instance(start, tmp_path, "a", postgres_dsn)
    b_proc, b = instance(start, tmp_path, "b", postgres_dsn)
    since = call(f"{b}/status")["seq"]
    assert call(f"{a}/status")["seq"] == since  # one sequence for all

    task = call(f"{a}/shop/prod", {"action": "hang"})["task"]
    created = call(f"{b}/tasks/created?since={since}&timeout=10")
    assert [t["id"] for t in created["tasks"]] == [task["id"]] and created["changed"]
    running = call(f"{b}/task/{task['id']}/state?since={created['next']}&timeout=10")
    assert running["changed"] and running["task"]["status"] == "running"

    # Killed through B: A, which runs it, stops it, and B answers once it has ended.
    killed: dict[str, Any] = call(f"{b}/task/{task['id']}/kill", {})
    assert (killed["status"], killed["killedBy"]) == ("killed", "127.0.0.1")
    assert ended(a, task["id"])["status"] == "killed"
    listed = call(f"{b}/tasks?output=false")
    assert listed["ids"] == [task["id"]] and listed["tasks"][str(task["id"])]["status"] == "killed"
    events = call(f"{a}/tasks/created?since={since}&timeout=0")
    assert events["next"] == call(f"{b}/tasks/created?since={since}&timeout=0")["next"]

    # A restart of B keeps the cursors: what A does after is there from B's old cursor on.
    cursor = call(f"{b}/status")["seq"]
    stop(b_proc)
    b_proc, b = instance(start, tmp_path, "b", postgres_dsn, run=2)
    later = call(f"{a}/shop/stage", {"action": "ok"})["task"]
    assert [t["id"] for t in call(f"{b}/tasks/created?since={cursor}&timeout=10")["tasks"]] == [later["id"]]
    assert ended(b, later["id"])["status"] == "finished"


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST JSON; the status and the JSON answer, errors too."""
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with OPENER.open(request, timeout=TIMEOUT) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def test_one_deploy_at_a_time_for_each_app_and_env_across_instances(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    bases = [instance(start, tmp_path, name, postgres_dsn)[1] for name in ("a", "b", "c")]
    # The same deploy through the three at once: the database lets exactly one run.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda base: post(base, "/shop/prod", {"action": "hang"}), bases))
    assert sorted(code for code, _ in answers) == [200, 409, 409], answers
    (holder,) = [answer["task"] for code, answer in answers if code == 200]
    refused = [answer["error"]["message"] for code, answer in answers if code == 409]
    assert all(f"busy with task {holder['id']}" in message for message in refused), refused

    # Queued through two others, they start one after the other, in the order they came.
    first = post(bases[1], "/shop/prod", {"action": "ok", "queue": True})[1]["task"]
    second = post(bases[2], "/shop/prod", {"action": "ok", "queue": True})[1]["task"]
    assert (first["status"], second["status"]) == ("queued", "queued")
    assert call(f"{bases[2]}/task/{holder['id']}/kill", {})["status"] == "killed"
    done = [ended(bases[0], task["id"]) for task in (first, second)]
    assert [task["status"] for task in done] == ["finished", "finished"]
    assert done[0]["finishedAt"] <= done[1]["startedAt"]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with OPENER.open(request, timeout=TIMEOUT) as resp:
        return resp.status, resp.read()


def test_the_output_of_one_instance_s_task_is_followed_through_another(
    start: Start, tmp_path: Path, postgres_dsn: str, gates: Path
) -> None:
    _, a = instance(start, tmp_path, "a", postgres_dsn)
    _, b = instance(start, tmp_path, "b", postgres_dsn)
    task = call(f"{a}/shop/prod", {"action": "gate[g]", "stdout": True})["task"]
    # Followed through B with byte offsets, as the console and `pulsar-rest follow` do.
    first = call(f"{b}/task/{task['id']}/output?offset=0&timeout=10")
    assert first["output"] == "waiting for g\n" and not first["complete"]
    (gates / "g").touch()
    text, offset = first["output"], first["nextOffset"]
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        answer = call(f"{b}/task/{task['id']}/output?offset={offset}&timeout=10")
        text, offset = text + answer["output"], answer["nextOffset"]
        if answer["complete"]:
            break
    assert answer["complete"] and answer["task"]["status"] == "finished", text
    whole = get(f"{a}/task/{task['id']}/log")[1]
    assert text.encode() == whole and whole.startswith(b"waiting for g\npassed g\n")
    # The log and the stdout, whole or in part, from the database through B.
    assert get(f"{b}/task/{task['id']}/log") == (200, whole)
    assert get(f"{b}/task/{task['id']}/log", {"Range": "bytes=-9"}) == (206, whole[-9:])
    assert get(f"{b}/task/{task['id']}/stdout")[1] == get(f"{a}/task/{task['id']}/stdout")[1]
    shown = call(f"{b}/task/{task['id']}")
    assert (shown["output"], shown["outputSize"]) == (whole.decode(), len(whole))


def test_when_an_instance_dies_the_others_interrupt_its_tasks_and_go_on(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    a_proc, a = instance(start, tmp_path, "a", postgres_dsn)
    _, b = instance(start, tmp_path, "b", postgres_dsn)
    task = call(f"{a}/shop/prod", {"action": "hang"})["task"]
    # Its first output shipped (B reads it), and a deploy of the same queued through B.
    assert "hanging" in call(f"{b}/task/{task['id']}/output?offset=0&timeout=10")["output"]
    queued = post(b, "/shop/prod", {"action": "ok", "queue": True})[1]["task"]
    assert queued["status"] == "queued"
    since = call(f"{b}/status")["seq"]

    a_proc.kill()  # kill -9: no goodbye
    a_proc.communicate(timeout=TIMEOUT)
    assert ended(b, task["id"])["status"] == "interrupted"
    assert call(f"{b}/task/{task['id']}/state?since={since}&timeout=0")["changed"]
    assert get(f"{b}/task/{task['id']}/log")[1].startswith(b"hanging")  # what was shipped stays
    assert ended(b, queued["id"])["status"] == "finished"  # the next deploy goes on, on B
    # What the task left running on this host is stopped (found by its marker).
    deadline = time.monotonic() + TIMEOUT
    while alive(task["pid"]):
        assert time.monotonic() < deadline, "the dead instance's task still runs"
        time.sleep(0.01)


async def test_a_listener_cut_by_the_database_costs_a_moment_not_an_event(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    _, a = instance(start, tmp_path, "a", postgres_dsn)
    b_proc, b = instance(start, tmp_path, "b", postgres_dsn)
    since = call(f"{b}/status")["seq"]
    b_name = (tmp_path / "b" / "data" / "instance").read_text().strip()
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        cut = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"pulsar-rest {b_name} listener",),
        )
        assert [row[0] for row in await cut.fetchall()] == [True]
    # Made at once through A: B still hears of it, within its tick, and listens again.
    task = call(f"{a}/shop/prod", {"action": "ok"})["task"]
    created = call(f"{b}/tasks/created?since={since}&timeout=5")
    assert [t["id"] for t in created["tasks"]] == [task["id"]]
    log = tmp_path / "b" / "logs-1" / "pulsar-rest.log"
    wait_for(lambda: "listening to" in log.read_text(), b_proc, "the listener to be back")


def follow_events(
    base: str, since: int, until: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Read /events (SSE) from `since` until `until(events)` holds: each event's id (its
    cursor), kind, task and status."""
    request = urllib.request.Request(f"{base}/events?since={since}")
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 2 * TIMEOUT  # checked at each line (a keep-alive at least)
    with OPENER.open(request, timeout=TIMEOUT) as stream:
        fields: dict[str, str] = {}
        for raw in stream:
            assert time.monotonic() < deadline, f"not all events came: {events}"
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "id" in fields and fields.get("event", "").startswith("task."):
                data = json.loads(fields["data"])
                events.append({"seq": int(fields["id"]), "event": fields["event"], "task": data["task"]["id"],
                               "status": data["status"]})  # fmt: skip
                if until(events):
                    return events
            fields = {}
    raise AssertionError("the event stream ended")


def test_a_soak_through_three_instances_loses_and_repeats_nothing(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    bases = [instance(start, tmp_path, name, postgres_dsn)[1] for name in ("a", "b", "c")]
    since = call(f"{bases[0]}/status")["seq"]
    count = 24  # half of them hang and are killed through another instance than theirs

    def done(events: list[dict[str, Any]]) -> bool:
        ended = {e["task"] for e in events if e["status"] in ("finished", "killed")}
        return len(ended) == count

    with ThreadPoolExecutor(3 + 8) as pool:
        followers = [pool.submit(follow_events, base, since, done) for base in bases]

        def deploy(index: int) -> dict[str, Any]:
            base = bases[index % 3]
            hang = index % 2 == 0
            task: dict[str, Any] = call(
                f"{base}/app{index}/prod", {"action": "hang" if hang else "lines[300]"}
            )["task"]
            if hang:
                assert "hanging" in call(f"{base}/task/{task['id']}/output?offset=0&timeout=10")["output"]
                assert call(f"{bases[(index + 1) % 3]}/task/{task['id']}/kill", {})["status"] == "killed"
            return task

        tasks = list(pool.map(deploy, range(count)))
        seen = [follower.result(timeout=TIMEOUT) for follower in followers]
    # Every instance told the same events, in the same order, each once, numbered without a gap.
    assert seen[0] == seen[1] == seen[2]
    assert [e["seq"] for e in seen[0]] == list(range(since + 1, since + 1 + len(seen[0])))
    by_task: dict[int, list[str]] = {}
    for event in seen[0]:
        by_task.setdefault(event["task"], []).append(event["status"])
    for index, task in enumerate(tasks):
        last = "killed" if index % 2 == 0 else "finished"
        assert by_task[task["id"]] == ["created", "running", last], (task["id"], by_task[task["id"]])
        # And every byte, the same through each instance.
        logs = {get(f"{base}/task/{task['id']}/log")[1] for base in bases}
        assert len(logs) == 1, task["id"]
        if last == "finished":
            assert logs.pop().count(b"\n") == 302  # 300 lines, then ok's two


async def test_an_instance_that_loses_its_lease_connection_takes_it_again_and_keeps_its_tasks(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    a_proc, a = instance(start, tmp_path, "a", postgres_dsn)
    _, b = instance(start, tmp_path, "b", postgres_dsn)
    task = call(f"{a}/shop/prod", {"action": "hang"})["task"]
    lease = f"pulsar-rest {(tmp_path / 'a' / 'data' / 'instance').read_text().strip()} lease"
    holder = (
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND s.application_name = %s"
    )
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        first = await (await admin.execute(holder, (lease,))).fetchall()
        assert len(first) == 1
        await admin.execute("SELECT pg_terminate_backend(%s)", first[0])
        # Held again: by another backend (the terminated one may show a moment longer).
        deadline = time.monotonic() + TIMEOUT
        while (now := await (await admin.execute(holder, (lease,))).fetchall()) in ([], first):
            assert time.monotonic() < deadline and a_proc.poll() is None, "the lease was not taken again"
            await asyncio.sleep(0.01)
        assert len(now) == 1
    # B, which looks for dead instances every second, took A for alive all along: the task
    # is never interrupted (B may show it a moment behind: its events come as they come).
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while not seen or seen[-1] != "running":
        seen.append(call(f"{b}/task/{task['id']}")["status"])
        assert time.monotonic() < deadline and "interrupted" not in seen, seen
        await asyncio.sleep(0.01)
    log = (tmp_path / "a" / "logs-1" / "pulsar-rest.log").read_text()
    assert "taking the lease again" in log
    assert call(f"{b}/task/{task['id']}/kill", {})["status"] == "killed"  # and A still hears B


def test_three_instances_behind_nginx_answer_one_client_as_one_server(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    """config/nginx.conf with the three in its upstream (round robin): a client that creates
    and follows a task through nginx meets a different instance at almost every request,
    and reads it as one server: every cursor and offset one instance gave is good on the
    next, however far behind it is (never a 410), and every byte comes once."""
    ports = [int(instance(start, tmp_path, name, postgres_dsn)[1].rsplit(":", 1)[1]) for name in "abc"]
    https = free_port()
    site = site_on_loopback(https, free_port(), ports[0])
    servers = "".join(f"\\1server 127.0.0.1:{port};\n" for port in ports)
    site = substitute(site, rf"^(\s*)server\s+127\.0\.0\.1:{ports[0]};.*\n", servers)
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    # Which instance answered each request, and how.
    site = (
        f"log_format upstream '$upstream_addr $status $request_uri';\n"
        f"access_log {tmp}/upstream.log upstream;\n{site}"
    )
    with nginx_running(tmp, site, https):
        tls = ssl.create_default_context(cafile=str(CERT))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
        )

        def through(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            return call(f"https://127.0.0.1:{https}{path}", body, opener)

        since = through("/status")["seq"]
        # 100-byte lines at 50 KB/s for 2 s: the instance running it is up to 0.1 s ahead
        # of the others, whose output comes from the database.
        task = through("/shop/prod", {"action": "paced[50000,2]"})["task"]
        created = through(f"/tasks/created?since={since}&timeout=10")
        assert [t["id"] for t in created["tasks"]] == [task["id"]]
        text, offset, polls = "", 0, 0
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline, f"the output did not end: {offset} bytes"
            answer = through(f"/task/{task['id']}/output?offset={offset}&timeout=10")
            assert answer["offset"] == offset
            text, offset, polls = text + answer["output"], answer["nextOffset"], polls + 1
            if answer["complete"]:
                break
        cursor, statuses = created["next"], list[str]()
        while not statuses or statuses[-1] not in ("finished", "failed"):
            assert time.monotonic() < deadline, f"the task did not end: {statuses}"
            state = through(f"/task/{task['id']}/state?since={cursor}&timeout=10")
            if state["changed"]:
                cursor = state["next"]
                statuses.append(state["task"]["status"])
        assert statuses[-1] == "finished"
    # The same bytes as the log the instance that ran it kept, each once.
    whole = {get(f"http://127.0.0.1:{port}/task/{task['id']}/log")[1] for port in ports}
    assert len(whole) == 1 and text.encode() == whole.pop()
    assert text.count("\n") >= 100 and polls >= 10
    answered = [line.split() for line in (tmp / "upstream.log").read_text().splitlines()]
    outputs = [(addr, status) for addr, status, uri in answered if "/output?" in uri]
    assert {addr for addr, _ in outputs} == {f"127.0.0.1:{port}" for port in ports}  # all three
    assert {status for _, status in outputs} == {"200"}
