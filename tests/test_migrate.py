"""`pulsar-rest migrate --to postgresql://...`: a SQLite history moved into PostgreSQL, and
served from there with the same data directory."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from pulsar_rest.auth.grants import Role
from pulsar_rest.pgstore import PgTokenAdmin
from pulsar_rest.settings import Settings
from pulsar_rest.store import SqliteStore, TokenAdmin
from pulsar_rest.tasks import Task, TaskStatus
from tests.conftest import ClientFactory, create, finished, follow, get_json
from tests.serving import ROOT, TIMEOUT, command, environ, listening_port

KEPT = (
    "id",
    "status",
    "app",
    "env",
    "action",
    "exitCode",
    "command",
    "createdAt",
    "finishedAt",
    "createdBy",
    "output",
)


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command("migrate", *args),
        cwd=ROOT,
        env=environ(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pulsar-rest migrate: "), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


async def test_a_history_moves_into_postgresql_and_is_served_from_there(
    make_client: ClientFactory, settings: Settings, postgres_dsn: str
) -> None:
    client = await make_client()
    made = [await finished(client, (await create(client, action, app=app))["id"]) for action, app in
            [("lines[20]", "shop"), ("pulsar-fail", "blog"), ("ok", "shop")]]  # fmt: skip
    before: dict[int, dict[str, Any]] = {t["id"]: await get_json(client, f"/task/{t['id']}") for t in made}
    logs = {task_id: await (await client.get(f"/task/{task_id}/log")).read() for task_id in before}
    audit = await get_json(client, "/audit")
    await client.close()
    admin = TokenAdmin(settings.data_dir)
    admin.create("ci", Role.WRITE, None)
    admin.close()

    dsn = postgres_dsn.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    done = migrate("--to", dsn, "--data-dir", str(settings.data_dir))
    assert done.returncode == 0, done.stderr
    assert (
        "3 tasks (with their output), 1 API tokens and 3 audit records moved into postgresql://postgres:***@"
        in done.stderr
    )
    assert "s3cret" not in done.stderr

    again = await make_client(database=postgres_dsn)
    elsewhere = await make_client(database=postgres_dsn, data_dir=settings.data_dir.parent / "elsewhere")
    for task_id, task in before.items():
        now = await get_json(again, f"/task/{task_id}")
        assert {k: now[k] for k in KEPT} == {k: task[k] for k in KEPT}
        assert await (await again.get(f"/task/{task_id}/log")).read() == logs[task_id]  # the same files
        # and in the database, for the instances of other data directories
        assert await (await elsewhere.get(f"/task/{task_id}/log")).read() == logs[task_id]
    listed = await get_json(again, "/tasks", app="shop")
    assert (listed["total"], listed["ids"]) == (2, [made[2]["id"], made[0]["id"]])
    assert (await get_json(again, "/status"))["tasks"] == {"finished": 2, "failed": 1}
    moved = await get_json(again, "/audit")
    assert [(e["id"], e["action"], e["taskId"]) for e in moved["entries"]][-3:] == [
        (e["id"], e["action"], e["taskId"]) for e in audit["entries"]
    ]
    assert (await create(again, "ok"))["id"] == made[-1]["id"] + 1  # ids go on
    tokens = await asyncio.to_thread(PgTokenAdmin(postgres_dsn).tokens)  # a command's, not async
    assert [token.name for token in tokens] == ["ci"]
    await again.close()
    await elsewhere.close()

    # Once there, never twice: the database holds tasks now.
    one_line_error(
        migrate("--to", postgres_dsn, "--data-dir", str(settings.data_dir)), "already holds 4 tasks"
    )


def test_migrate_refuses_while_a_server_uses_the_data_directory(
    start: Any, tmp_path: Path, postgres_dsn: str
) -> None:
    proc = start()
    listening_port(tmp_path / "logs" / "pulsar-rest.log", proc)
    one_line_error(
        migrate("--to", postgres_dsn, "--data-dir", str(tmp_path / "data")),
        f"--data-dir {tmp_path / 'data'} is in use by another pulsar-rest",
    )


def test_migrate_errors_are_one_line(tmp_path: Path) -> None:
    one_line_error(migrate("--to", "mysql://x/y", "--data-dir", str(tmp_path)), "--database: *** must be")
    one_line_error(migrate("--data-dir", str(tmp_path)), "--to")
    one_line_error(
        migrate("--to", "postgresql://127.0.0.1:1/x", "--data-dir", str(tmp_path)), "holds no history"
    )


async def test_a_migrated_task_a_crash_left_unfinished_is_interrupted_once(
    make_client: ClientFactory, settings: Settings, postgres_dsn: str
) -> None:
    """A server crashed with a task running, then its history was moved: the task is that
    data directory's instance's, and with no server on it, the others interrupt it, once
    (not each as its own at its start)."""
    store = SqliteStore(settings.data_dir)
    await store.open()
    running = Task(1, "shop", "prod", "deploy", ["pulsar"], store.new_output(1), status=TaskStatus.RUNNING)
    await store.add(running)
    await store.close()
    assert migrate("--to", postgres_dsn, "--data-dir", str(settings.data_dir)).returncode == 0

    # Two instances of other data directories, started together (as after a migration).
    here = await asyncio.gather(
        *(make_client(database=postgres_dsn, data_dir=settings.data_dir.parent / name) for name in "bc")
    )
    await follow(here[0], 1, lambda task: task["status"] == "interrupted", TIMEOUT)  # the others' sweep
    conn = await psycopg.AsyncConnection.connect(postgres_dsn)
    async with conn:
        changes = await (await conn.execute("SELECT status FROM events WHERE task_id = 1")).fetchall()
    assert changes == [("interrupted",)]
    for client in here:
        await client.close()
