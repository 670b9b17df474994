"""`pulsar-rest migrate --to postgresql://...`: move a data directory's SQLite history into
PostgreSQL, for a server started with `--database` from then on.

It runs while no server uses the data directory (it takes the directory's lock, as a server
does), and only into a database that holds no task yet; all of it or nothing (one
transaction). Tasks keep their ids, and ids go on after the last one ever handed out; their
output, the API tokens (their hashes) and the audit come along. The log files stay too.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from psycopg import sql

from pulsar_rest.datadir import DataDirError, DataDirLock
from pulsar_rest.pgstore import CHUNK as LOG_CHUNK
from pulsar_rest.pgstore import UPSERT, PgStore, instance_id, pg_row, shown_dsn
from pulsar_rest.settings import SettingsError, load_settings, without_values
from pulsar_rest.store import DB_NAME, SqliteStore, StoreError, history_rows

# Tasks read and written at a time: memory stays small whatever the history's length.
CHUNK = 5000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SettingsError(f"{without_values(message)} (see pulsar-rest migrate --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pulsar-rest migrate",
        allow_abbrev=False,
        description="Move the SQLite history of a data directory into an empty PostgreSQL database.",
    )
    parser.add_argument("--to", required=True, metavar="URL", help="the database: postgresql://USER@HOST/DB")
    parser.add_argument("--data-dir", metavar="DIR", help="the server's data directory")
    parser.add_argument(
        "--config", metavar="FILE", help="the server's YAML settings (for its data directory)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    try:
        args = _parser().parse_args(list(argv))
        server_args = ["--database", args.to]
        for flag, value in (("--data-dir", args.data_dir), ("--config", args.config)):
            if value is not None:
                server_args += [flag, value]
        settings = load_settings(server_args)
        assert settings.database is not None
        if not (settings.data_dir / DB_NAME).exists():
            raise StoreError(f"--data-dir {settings.data_dir} holds no history ({DB_NAME})")
        lock = DataDirLock.claim(settings.data_dir)  # no server may write while it is copied
        try:
            moved = asyncio.run(_migrate(settings.data_dir, settings.database))
        finally:
            lock.release()
    except (SettingsError, StoreError, DataDirError) as exc:
        print(f"pulsar-rest migrate: {exc}", file=sys.stderr)
        return 2
    tasks, tokens, records = moved
    print(
        f"pulsar-rest migrate: {tasks} tasks (with their output), {tokens} API tokens and {records} "
        f"audit records moved into {shown_dsn(settings.database)}; start pulsar-rest with --database",
        file=sys.stderr,
    )
    return 0


async def _migrate(data_dir: Path, dsn: str) -> tuple[int, int, int]:
    source = SqliteStore(data_dir)
    await source.open()  # brings an older schema up to date
    await source.close()
    target = PgStore(dsn, data_dir)
    await target.open()  # makes the schema
    await target.close()
    db = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True)
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10, options="-c timezone=UTC")
    except psycopg.Error as exc:
        db.close()
        raise StoreError(f"--to {shown_dsn(dsn)}: {str(exc).strip().splitlines()[0]}") from None
    try:
        async with conn, conn.transaction():
            return await _copy(db, conn, data_dir)
    except psycopg.Error as exc:
        raise StoreError(f"--to {shown_dsn(dsn)}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        db.close()


async def _copy(
    db: sqlite3.Connection, conn: psycopg.AsyncConnection[Any], data_dir: Path
) -> tuple[int, int, int]:
    # Nobody else writes while this runs: a server that started meanwhile waits for the lock.
    await conn.execute("LOCK TABLE tasks, api_tokens, audit, meta IN EXCLUSIVE MODE")
    held = await (await conn.execute("SELECT count(*) FROM tasks")).fetchone()
    if held and held[0]:
        raise StoreError(f"the database already holds {held[0]} tasks: migrate into an empty one")
    tasks = 0
    # Its unfinished tasks (a server that crashed) are this data directory's instance's: a
    # server started on it recovers them, and if none is, the others take them for those of
    # an instance that is gone (interrupted, once).
    owner = instance_id(data_dir)
    async with conn.cursor() as cursor:
        for chunk in history_rows(db, data_dir, CHUNK):
            await cursor.executemany(UPSERT, [pg_row(task, owner) for task in chunk])
            tasks += len(chunk)
            for task in chunk:  # their output too: every instance reads it from the database
                await _copy_log(cursor, task.id, 0, task.output.path)
                if task.stdout is not None:
                    await _copy_log(cursor, task.id, 1, task.stdout.path)
    # Ids go on after the last one ever handed out (pruned ones included), as in SQLite.
    last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
    if last and last[0]:
        await conn.execute("SELECT setval('tasks_id_seq', %s)", (last[0],))
    run = db.execute("SELECT value FROM meta WHERE key = 'run'").fetchone()
    if run:
        await conn.execute("UPDATE meta SET value = %s WHERE key = 'run'", (run[0],))
    tokens = db.execute(
        "SELECT name, digest, role, created_at, expires_at, last_used_at FROM api_tokens"
    ).fetchall()
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO api_tokens VALUES (%s, %s, %s, %s, %s, %s)",
            [(name, hashed, role, *map(_when, times)) for name, hashed, role, *times in tokens],
        )
    records = db.execute(
        "SELECT id, at, action, who, remote, task_id, detail FROM audit ORDER BY id"
    ).fetchall()
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO audit (id, at, action, who, remote, task_id, detail) OVERRIDING SYSTEM VALUE "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(record_id, _when(at), *rest) for record_id, at, *rest in records],
        )
    if records:
        await conn.execute("SELECT setval(pg_get_serial_sequence('audit', 'id'), %s)", (records[-1][0],))
    return tasks, len(tokens), len(records)


async def _copy_log(cursor: psycopg.AsyncCursor[Any], task_id: int, stream: int, path: Path) -> None:
    """A log file into output_chunks, a piece at a time (memory stays small)."""
    start = 0
    try:
        with path.open("rb") as log:
            while data := log.read(LOG_CHUNK):
                await cursor.execute(
                    "INSERT INTO output_chunks VALUES (%s, %s, %s, %s)", (task_id, stream, start, data)
                )
                start += len(data)
    except FileNotFoundError:
        return  # it never wrote
    column = "stdout_size" if stream else "output_size"
    await cursor.execute(
        sql.SQL("UPDATE tasks SET {} = %s WHERE id = %s").format(sql.Identifier(column)), (start, task_id)
    )


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
