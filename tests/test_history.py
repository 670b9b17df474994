"""History that survives: restarts and crashes, paging and filters, retention, shutdown."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pulsar_rest.audit import AuditAction, AuditRecord
from pulsar_rest.pgstore import PgStore
from pulsar_rest.settings import Settings
from pulsar_rest.store import DB_NAME, SqliteStore, StoreError, TaskFilter, TaskStore
from pulsar_rest.tasks import Task, TaskStatus
from pulsar_rest.web.app import shutdown
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
    waiters,
)
from tests.serving import call, listening_port


def open_store(data_dir: Path, database: str | None) -> TaskStore:
    return SqliteStore(data_dir) if database is None else PgStore(database, data_dir)


# Fields that must come back identical after a restart.
KEPT = (
    "id", "status", "app", "env", "action", "exitCode", "signal", "killSignal", "pid", "command", "createdAt",
    "startedAt", "finishedAt", "createdBy", "killedBy", "outputSize", "output",
)  # fmt: skip


async def test_history_and_output_survive_a_restart(
    make_client: ClientFactory, gates: Path, database: str | None
) -> None:
    client = await make_client(database=database)
    ok = await finished(client, (await create(client, "lines[3000]"))["id"])
    failed = await finished(client, (await create(client, "pulsar-fail", app="blog"))["id"])
    hanging = await create(client, "hang")
    await follow(client, hanging["id"], lambda t: "hanging" in t["output"])
    assert (await client.post(f"/task/{hanging['id']}/kill")).status == 200
    running = await create(client, "gate[never]")
    await follow(client, running["id"], lambda t: "waiting for never" in t["output"])
    before = {t["id"]: await get_json(client, f"/task/{t['id']}") for t in (ok, failed, hanging)}
    logs = {task_id: await (await client.get(f"/task/{task_id}/log")).read() for task_id in before}
    await client.close()  # a graceful stop: what still runs is killed, and recorded so

    again = await make_client(database=database)
    for task_id, task in before.items():
        now = await get_json(again, f"/task/{task_id}")
        assert {k: now[k] for k in KEPT} == {k: task[k] for k in KEPT}
        assert await (await again.get(f"/task/{task_id}/log")).read() == logs[task_id]
    stopped = await get_json(again, f"/task/{running['id']}")
    assert (stopped["status"], stopped["killedBy"]) == ("killed", "shutdown")
    assert stopped["output"].startswith("waiting for never\n")
    assert [t["status"] for t in before.values()] == ["finished", "failed", "killed"]
    assert [t["killSignal"] for t in before.values()] == [None, None, "SIGTERM"]
    assert before[failed["id"]]["createdBy"] == "127.0.0.1"
    # Ids go on from where they were, never reused.
    assert (await create(again, "ok"))["id"] == running["id"] + 1


async def test_ids_are_not_reused_after_the_newest_tasks_are_pruned(
    make_client: ClientFactory, database: str | None
) -> None:
    client = await make_client(database=database)
    last = [(await finished(client, (await create(client, "ok"))["id"]))["id"] for _ in range(3)][-1]
    await client.close()
    # Restarting with a retention of nothing removes every ended task...
    pruned = await make_client(retain_tasks=0, database=database)
    assert (await get_json(pruned, "/tasks"))["total"] == 0
    await pruned.close()
    # ...and still the next id is new.
    again = await make_client(database=database)
    assert (await create(again, "ok"))["id"] == last + 1


async def test_paging_and_filters(make_client: ClientFactory, database: str | None) -> None:
    client = await make_client(database=database)
    made = []
    for app, env, action in [
        ("shop", "prod", "ok"), ("shop", "stage", "ok"), ("blog", "prod", "fail"), ("shop", "prod", "fail"),
        ("blog", "prod", "ok"), ("shop", "prod", "ok"), ("shop", "prod", "ok"),
    ]:  # fmt: skip
        made.append(await finished(client, (await create(client, action, app=app, env=env))["id"]))
    ids = [t["id"] for t in made]
    first = await get_json(client, "/tasks", pageSize=3)
    assert (first["total"], first["page"], first["pageSize"], first["pages"]) == (7, 1, 3, 3)
    assert first["ids"] == ids[::-1][:3]  # newest first
    assert list(first["tasks"]) == [str(i) for i in ids[::-1][:3]]
    third = await get_json(client, "/tasks", pageSize=3, currentPage=3)  # the later API's name
    assert third["ids"] == [ids[0]]
    assert (await get_json(client, "/tasks", pageSize=3, page=4))["ids"] == []
    shop_prod = await get_json(client, "/tasks", app="shop", env="prod")
    assert shop_prod["ids"] == [ids[6], ids[5], ids[3], ids[0]] and shop_prod["total"] == 4
    failed = await get_json(client, "/tasks", status="failed")
    assert failed["ids"] == [ids[3], ids[2]]
    assert (await get_json(client, "/tasks", app="blog", status="finished"))["ids"] == [ids[4]]
    assert "unknown status" in (await get_json(client, "/tasks", 400, status="done"))["error"]["message"]
    assert "pageSize" in (await get_json(client, "/tasks", 400, pageSize=1001))["error"]["message"]


async def test_retention_by_count_keeps_the_newest_and_never_a_running_task(
    make_client: ClientFactory, gates: Path, settings: Settings, database: str | None
) -> None:
    client = await make_client(retain_tasks=2, database=database)
    running = await create(client, "gate[r]")
    done = [await finished(client, (await create(client, "ok", app=f"app{i}"))["id"]) for i in range(4)]
    # Pruned once the last one has ended: its end is published first, then the old ones go.
    logs = settings.data_dir / "logs"
    await eventually(lambda: not (logs / f"{done[1]['id']}.log").exists(), what="the pruning")
    listed = await get_json(client, "/tasks")
    assert listed["ids"] == [done[3]["id"], done[2]["id"], running["id"]]
    # The counts are kept up as tasks end and go: they are those of the history.
    assert (await get_json(client, "/status"))["tasks"] == {"finished": 2, "running": 1}
    for old in done[:2]:
        await get_json(client, f"/task/{old['id']}", 404)
        assert not (logs / f"{old['id']}.log").exists()
    assert (logs / f"{done[3]['id']}.log").exists()
    release(gates, "r")  # ended, it is the oldest: pruned at once
    await eventually(lambda: not (logs / f"{running['id']}.log").exists(), what="the pruning")
    await get_json(client, f"/task/{running['id']}", 404)
    assert (await get_json(client, "/status"))["tasks"] == {"finished": 2}


async def test_retention_by_age_at_start(make_client: ClientFactory, database: str | None) -> None:
    client = await make_client(database=database)
    task = await finished(client, (await create(client, "ok"))["id"])
    await client.close()
    kept = await make_client(retain_days=1, database=database)
    assert (await get_json(kept, "/tasks"))["ids"] == [task["id"]]
    await kept.close()
    pruned = await make_client(retain_days=0, database=database)
    assert (await get_json(pruned, "/tasks"))["ids"] == []


async def test_graceful_shutdown_answers_waiters_refuses_tasks_and_lets_tasks_end(
    client: Client, gates: Path
) -> None:
    assert client.app is not None
    task = await create(client, "gate[end]")
    await follow(client, task["id"], lambda t: "waiting for end" in t["output"])
    queued = await post_json(client, "/app/prod", action="ok", queue=True)
    poll = asyncio.create_task(client.get("/tasks/created"))
    await eventually(lambda: waiters(client) == 1, what="the long-poll")
    stopping = asyncio.create_task(shutdown(client.app, grace=30))
    answer = await poll
    assert await answer.json() == {"changed": False}  # answered at once, not in 10 s
    refused = await client.post("/shop/prod", json={"action": "ok"})
    assert refused.status == 503
    assert "shutting down" in (await refused.json())["error"]["message"]
    assert not stopping.done()  # the running task is given its time
    release(gates, "end")
    # Done once the running task has ended: a queued task never starts now, so nothing
    # waits for it (it is killed by the cleanup that follows).
    await asyncio.wait_for(stopping, 10)
    assert (await get_json(client, f"/task/{task['id']}"))["status"] == "finished"
    assert (await get_json(client, f"/task/{queued['taskId']}"))["status"] == "queued"


async def test_shutdown_kills_what_outlives_the_grace(make_client: ClientFactory) -> None:
    client = await make_client()
    assert client.app is not None
    task = await create(client, "ignore-term")
    await follow(client, task["id"], lambda t: "ignoring SIGTERM" in t["output"])
    await shutdown(client.app, grace=0.1)
    assert alive(task["pid"])  # the grace is over; the kill comes with the cleanup
    await client.close()
    assert not alive(task["pid"])
    again = await make_client()
    stopped = await get_json(again, f"/task/{task['id']}")
    assert (stopped["status"], stopped["signal"], stopped["killedBy"]) == ("killed", "SIGKILL", "shutdown")


async def test_variable_names_are_history_and_values_never_are(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client()
    variables = {"RELEASE": "v1.2", "TOKEN": "s3cr3t-value"}
    answer = await post_json(client, "/app/prod", action="env[RELEASE]", taskVariables=variables)
    task = await finished(client, answer["taskId"])
    assert json.loads(task["output"].splitlines()[0]) == {"RELEASE": "v1.2"}
    assert client.app is not None
    assert (await client.app[SERVICE].get(task["id"])).variables == {}  # not kept once it has ended
    await client.close()
    again = await make_client()
    assert (await get_json(again, f"/task/{task['id']}"))["taskVariables"] == ["RELEASE", "TOKEN"]
    assert not any(b"s3cr3t-value" in path.read_bytes() for path in settings.data_dir.glob("pulsar-rest.db*"))


# The database of an earlier version (schema 2, before stdout could be kept apart), as it
# was written then: a newer server opens it and keeps its history.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, env TEXT NOT NULL,
    action TEXT NOT NULL, command TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    started_at TEXT, finished_at TEXT, pid INTEGER, exit_code INTEGER, signal TEXT,
    created_by TEXT, killed_by TEXT, marker TEXT, created_seq INTEGER NOT NULL,
    state_seq INTEGER NOT NULL, output_size INTEGER NOT NULL DEFAULT 0, conf_commit TEXT
);
INSERT INTO meta VALUES ('schema', '2'), ('run', '4');
INSERT INTO tasks VALUES (7, 'shop', 'prod', 'deploy', '["pulsar"]', 'finished',
    '2026-11-01T10:00:00+00:00', '2026-11-01T10:00:01+00:00', '2026-11-01T10:00:09+00:00',
    4242, 0, NULL, '10.0.0.1', NULL, 'abc', 3, 5, 12, 'c0ffee');
"""


async def test_a_database_of_schema_2_is_upgraded_and_kept(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(SCHEMA_2)
    db.close()
    store = SqliteStore(tmp_path)
    history = await store.open()
    try:
        assert history.live == [] and history.ended == {"finished": 1}
        (task,) = (await store.find([7])).values()
        assert (await store.page(TaskFilter(app="shop"), 0, 10))[1] == 1  # counted by the upgrade
        assert (task.id, task.app, task.status, task.conf_commit, task.stdout) == (
            7, "shop", "finished", "c0ffee", None,
        )  # fmt: skip
        assert history.run == 5 and await store.next_id() == 8
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("7",)
        row = db.execute("SELECT stdout, variable_names, kill_signal FROM tasks WHERE id = 7").fetchone()
        assert row == (0, "[]", None)
    finally:
        db.close()


async def test_a_database_of_schema_6_gets_its_block_counts(tmp_path: Path) -> None:
    """Schema 6 had the counts, not the block counts by which lists page: the upgrade
    counts the blocks of what is there."""
    store = SqliteStore(tmp_path)
    await store.open()
    for task_id in range(1, 11):
        app = "shop" if task_id % 2 else "blog"
        output = store.new_output(task_id)
        await store.add(Task(task_id, app, "prod", "deploy", ["pulsar"], output, status=TaskStatus.QUEUED))
    await store.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("DELETE FROM task_blocks")  # as schema 6 left it
    db.execute("UPDATE meta SET value = '6' WHERE key = 'schema'")
    db.commit()
    db.close()
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        tasks, total = await store.page(TaskFilter(), 0, 4)
        assert total == 10 and [task.id for task in tasks] == [10, 9, 8, 7]
        tasks, total = await store.page(TaskFilter(app="shop"), 2, 10)
        assert total == 5 and [task.id for task in tasks] == [5, 3, 1]
    finally:
        await store.close()


async def test_writes_of_one_turn_share_a_commit_and_a_failed_one_spares_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        statements: list[str] = []
        store._connection().set_trace_callback(statements.append)
        store.add_audit(AuditRecord(AuditAction.CREATE, "alice", "10.0.0.1", "shop/prod deploy", 1))
        store._queue("INSERT INTO nowhere VALUES (?)", (1,))  # fails: no such table
        store.add_audit(AuditRecord(AuditAction.KILL, "bob", "10.0.0.2", "shop/prod deploy", 1))
        records, total = await store.audit_page(0, 10)
        assert [(r.who, r.action) for r in records] == [("bob", "kill"), ("alice", "create")]
        assert total == 2
        assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
        assert "cannot write to" in caplog.text and "no such table: nowhere" in caplog.text
    finally:
        await store.close()


async def test_a_task_written_several_times_in_a_batch_is_written_once_as_it_came_last(
    tmp_path: Path,
) -> None:
    """Created, running and ended in one batch (a short task's rows often meet there): one
    write of its row, where it came first (before the audit record of its creation), with
    what it was last; the write waited for is done with it."""
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        statements: list[str] = []
        store._connection().set_trace_callback(statements.append)
        task_id = await store.next_id()
        task = Task(
            id=task_id,
            app="shop",
            env="prod",
            action="ok",
            command=["pulsar"],
            output=store.new_output(task_id),
        )
        store.save(task)
        added = asyncio.ensure_future(store.add(task))
        store.add_audit(AuditRecord(AuditAction.CREATE, "alice", "10.0.0.1", "shop/prod ok", task_id))
        task.start(4242)
        store.save(task)
        task.end(TaskStatus.FINISHED, exit_code=0)
        store.save(task)
        await added
        # (SQLite's trace tells a statement again for each trigger it runs.)
        rows = [s for s in statements if s.startswith("INSERT INTO tasks")]
        assert len(set(rows)) == 1 and "'finished'" in rows[0]
        audit = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO audit"))
        assert statements.index(rows[0]) < audit
        found = (await store.find([task_id]))[task_id]
        assert (found.status, found.pid, found.exit_code) == (TaskStatus.FINISHED, 4242, 0)
    finally:
        await store.close()


async def test_a_start_beside_another_writer_waits_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection (the token command, a second server) writes while a store opens:
    the opening's upgrade, which reads and then writes, holds the lock from its start, so
    neither fails at once with "database is locked" (a deferred transaction would)."""
    first = SqliteStore(tmp_path)
    await first.open()
    await first.close()
    other = sqlite3.connect(tmp_path / DB_NAME, timeout=0.05, isolation_level=None, check_same_thread=False)
    wrote: list[bool] = []
    real = SqliteStore._meta

    def meta(self: SqliteStore, key: str) -> str | None:
        value = real(self, key)
        try:  # between the upgrade's read and its write
            other.execute(
                "INSERT INTO audit (at, action, detail) VALUES ('2026-12-06T00:00:00+00:00', 'create', '')"
            )
            wrote.append(True)
        except sqlite3.OperationalError:
            wrote.append(False)  # it waited for the lock the opening holds, and gave up
        return value

    monkeypatch.setattr(SqliteStore, "_meta", meta)
    store = SqliteStore(tmp_path)
    try:
        await store.open()
    finally:
        await store.close()
        other.close()
    assert wrote and not any(wrote)


async def test_an_upgrade_that_fails_changes_nothing(tmp_path: Path) -> None:
    # A schema-2 database someone already gave one of schema 3's columns: the upgrade
    # stops at it, and what it did before is undone.
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(SCHEMA_2 + "ALTER TABLE tasks ADD COLUMN variable_names TEXT;")
    db.close()
    with pytest.raises(StoreError, match="duplicate column name: variable_names"):
        await SqliteStore(tmp_path).open()
    db = sqlite3.connect(tmp_path / DB_NAME)
    try:
        columns = [row[1] for row in db.execute("PRAGMA table_info(tasks)")]
        assert "stdout" not in columns
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
        assert db.execute("SELECT value FROM meta WHERE key = 'run'").fetchone() == ("4",)
    finally:
        db.close()


async def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"pulsar-rest\.db cannot be used .*backup"):
        await SqliteStore(tmp_path).open()


async def test_an_unusable_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"--data-dir .*file"):
        await SqliteStore(blocker).open()


def test_the_command_says_so_in_one_line(tmp_path: Path, pulsar_bin: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"garbage" * 1000)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pulsar_rest",
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--pulsar-bin",
            pulsar_bin,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parents[1],
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pulsar-rest: --data-dir")
    assert "Traceback" not in done.stderr


def test_kill_9_mid_output_keeps_every_byte_and_interrupts_the_task(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path, gates: Path
) -> None:
    server = start()
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs' / 'pulsar-rest.log', server)}"
    task = call(f"{base}/shop/production", {"action": "record[written]"})["task"]
    hanging = call(f"{base}/shop/staging", {"action": "hang"})["task"]
    # The task writes as fast as it can; wait until the server has taken in a good part.
    seen = 0
    while seen < 2_000_000:
        seen = call(f"{base}/task/{task['id']}/output?offset={seen}&timeout=5")["nextOffset"]
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)

    again = start("--log-dir", str(tmp_path / "logs-again"))  # the last --log-dir wins
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs-again' / 'pulsar-rest.log', again)}"
    after = call(f"{base}/task/{task['id']}")
    assert after["status"] == "interrupted" and after["finishedAt"] is not None
    log = (tmp_path / "data" / "logs" / f"{task['id']}.log").read_bytes()
    written = (gates / "written").read_bytes()
    # Every byte the server had taken in is there, and nothing but what the task wrote.
    assert len(log) >= seen
    assert log == written[: len(log)]
    assert after["outputSize"] == len(log)
    # The task that hung was left running by the crash: the restart stopped it.
    assert call(f"{base}/task/{hanging['id']}")["status"] == "interrupted"
    assert not alive(hanging["pid"])
    assert call(f"{base}/shop/production", {"action": "ok"})["task"]["id"] == hanging["id"] + 1
    json.dumps(after)  # the answer is plain JSON


async def test_lists_are_queries_on_the_store_and_match_every_filter_and_page(
    tmp_path: Path, database: str | None
) -> None:
    """The store answers lists from its indexes and its counts (kept by triggers through
    inserts, changes and prunes); each page and total must be what filtering every task
    gives, from both ends of the history."""
    rng = random.Random(15)
    store = open_store(tmp_path, database)
    await store.open()
    tasks: dict[int, Task] = {}
    going: set[tuple[str, str]] = set()
    try:
        for index in range(400):
            # Ids spread over some hundred blocks of 4,096 (the counts SQLite pages by).
            task_id = 1 + index * 1031
            app, env = rng.choice(["shop", "blog", "wiki"]), rng.choice(["prod", "stage"])
            # The first of each app and env runs (one at a time may, for an app and env).
            status = rng.choice([TaskStatus.QUEUED, TaskStatus.FINISHED])
            if (app, env) not in going:
                going.add((app, env))
                status = TaskStatus.RUNNING
            task = Task(
                id=task_id,
                app=app,
                env=env,
                action="deploy",
                command=["pulsar"],
                output=store.new_output(task_id),
                status=status,
                created_by=rng.choice(["alice", "bob", None]),
            )
            tasks[task_id] = task
            await store.add(task)
        for task in rng.sample(list(tasks.values()), 150):  # changes recount
            task.status = rng.choice([TaskStatus.FAILED, TaskStatus.KILLED, TaskStatus.FINISHED])
            store.save(task)
        pruned = await store.prune(keep=200, before=None)
        ended = sorted(t.id for t in tasks.values() if t.status.ended)
        assert [task_id for task_id, _ in pruned] == ended[: len(ended) - 200]  # the oldest ended
        for task_id, status in pruned:
            assert tasks.pop(task_id).status is status

        filters = [
            TaskFilter(),
            TaskFilter(app="shop"),
            TaskFilter(env="stage", status="queued"),
            TaskFilter(env="stage", status="running"),
            TaskFilter(status="finished"),
            TaskFilter(created_by="alice"),
            TaskFilter(app="blog", env="prod", status="failed", created_by="bob"),
            TaskFilter(app="nothing"),
            TaskFilter(created_by=""),  # nobody: tasks without a creator are not ''
        ]
        for where in filters:
            expected = [
                t.id
                for t in sorted(tasks.values(), key=lambda t: -t.id)
                if all(getattr(t, column) == value for column, value in where.terms())
            ]
            for size in (7, 50):
                for offset in range(0, len(expected) + size, size):
                    page, total = await store.page(where, offset, size)
                    assert total == len(expected), where
                    assert [t.id for t in page] == expected[offset : offset + size], (where, offset)
        (shown,), _ = await store.page(TaskFilter(), 0, 1)
        newest = tasks[max(tasks)]
        assert (shown.id, shown.app, shown.status, shown.created_by) == (
            newest.id, newest.app, newest.status, newest.created_by,
        )  # fmt: skip
        found = await store.find([*list(tasks)[:3], pruned[0][0]])
        assert sorted(found) == sorted(list(tasks)[:3])  # not the pruned one
    finally:
        await store.close()

    again = open_store(tmp_path, database)
    history = await again.open()  # what a start loads: the live tasks and the counts only
    try:
        assert [t.id for t in history.live] == sorted(t.id for t in tasks.values() if not t.status.ended)
        assert history.ended == dict(
            collections.Counter(t.status.value for t in tasks.values() if t.status.ended)
        )
    finally:
        await again.close()
