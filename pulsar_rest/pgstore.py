"""The history in PostgreSQL (`--database postgresql://...`), behind the same `TaskStore`
interface as SQLite: tasks, their ids, the counts that lists are answered from, the API
tokens and the audit. The output stays in log files in the data directory.

Every statement goes through one connection, in order, as SQLite's go through one thread:
what was written before a read is there for it. The writes asked for in one turn of the
event loop share one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pulsar_rest.audit import AuditAction, AuditRecord
from pulsar_rest.auth.grants import Role
from pulsar_rest.auth.tokens import ApiToken, digest, new_token
from pulsar_rest.events import KEEP_EVENTS, Event, EventKind
from pulsar_rest.names import check_name
from pulsar_rest.output import ChunkLog, OutputLog
from pulsar_rest.store import (
    AppEnvBusy,
    History,
    LogFiles,
    StoreError,
    TaskFilter,
    TokenExists,
    fields_of,
    task_from,
)
from pulsar_rest.tasks import Task, TaskStatus, utcnow
from pulsar_rest.turns import TurnBatch

log = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.AsyncConnection[tuple[Any, ...]]
Job = tuple[Callable[[Connection], Awaitable[Any]], asyncio.Future[Any]]
Write = tuple[sql.Composed | sql.SQL, tuple[Any, ...], asyncio.Future[None] | None]
# In a batch of writes, an event to number (its values: kind, task id, status).
_EVENT = sql.SQL("-- event")
# The channel every instance listens on: "e" when events were committed.
CHANNEL = "pulsar"

SCHEMA_VERSION = 1
# Held while the schema is made or upgraded: instances that start together take turns.
_SCHEMA_LOCK = 0x70756C73  # "puls"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
-- Ids from a sequence: never handed out twice, by any instance (gaps are fine).
CREATE SEQUENCE IF NOT EXISTS tasks_id_seq;
CREATE TABLE IF NOT EXISTS tasks (
    id bigint PRIMARY KEY,
    app text NOT NULL,
    env text NOT NULL,
    action text NOT NULL,
    command jsonb NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    pid integer,
    exit_code integer,
    signal text,
    created_by text,
    killed_by text,
    marker text,
    created_seq bigint NOT NULL,
    state_seq bigint NOT NULL,
    output_size bigint NOT NULL DEFAULT 0,
    conf_commit text,
    stdout boolean NOT NULL DEFAULT false,
    variable_names jsonb NOT NULL DEFAULT '[]',
    kill_signal text
);
-- Lists: a page is found in an index alone, in id order, whatever the filter (the primary
-- key's index serves the list without one).
-- One deploy at a time for each app and environment, whichever instance starts it: a second
-- task going for the same waits for the first one's transaction, then is refused.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_going ON tasks (app, env) WHERE status IN ('created', 'running');
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, id) INCLUDE (app, env, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_app ON tasks (app, id) INCLUDE (env, status, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_env ON tasks (env, id) INCLUDE (app, status, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_creator ON tasks (created_by, id) INCLUDE (app, env, status);
-- How many tasks there are of each app, environment, status and creator ('' for none).
CREATE TABLE IF NOT EXISTS task_counts (
    app text NOT NULL,
    env text NOT NULL,
    status text NOT NULL,
    created_by text NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (app, env, status, created_by)
);
CREATE OR REPLACE FUNCTION pulsar_count_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE task_counts SET n = n - 1 WHERE (app, env, status, created_by)
            = (OLD.app, OLD.env, OLD.status, coalesce(OLD.created_by, ''));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO task_counts VALUES (NEW.app, NEW.env, NEW.status, coalesce(NEW.created_by, ''), 1)
            ON CONFLICT (app, env, status, created_by) DO UPDATE SET n = task_counts.n + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER tasks_counted AFTER INSERT OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION pulsar_count_task();
CREATE OR REPLACE TRIGGER tasks_recounted AFTER UPDATE OF app, env, status, created_by ON tasks
    FOR EACH ROW WHEN ((OLD.app, OLD.env, OLD.status, coalesce(OLD.created_by, ''))
        IS DISTINCT FROM (NEW.app, NEW.env, NEW.status, coalesce(NEW.created_by, '')))
    EXECUTE FUNCTION pulsar_count_task();
-- Which instance runs a task (its --data-dir's identity): a restart recovers its own only.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS owner text;
-- Who asked another instance than its owner to stop a task ('' for nobody known): its owner
-- reads it and stops the task. A column of its own: the owner's saves never undo it.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS kill_requested_by text;
-- The output, as the instance that runs a task ships it (stream 0: all of it; 1: its stdout
-- kept apart), a few times a second and whole before its end: every instance reads it, and
-- it outlives the instance. output_size (and stdout_size) count what is shipped.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS stdout_size bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS output_chunks (
    task_id bigint NOT NULL REFERENCES tasks ON DELETE CASCADE,
    stream smallint NOT NULL,
    start bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (task_id, stream, start)
);
-- Events: creations and status changes, numbered by one counter taken last in the writing
-- transaction (its row stays locked to the commit), so numbers appear in commit order and a
-- reader that has seen N has seen every number below it.
CREATE TABLE IF NOT EXISTS event_counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO event_counter VALUES (true, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS events (
    seq bigint PRIMARY KEY,
    kind text NOT NULL,
    task_id bigint NOT NULL,
    status text,
    at timestamptz NOT NULL DEFAULT now()
);
-- The high half of every cursor: the same for as long as this history lives (a restart keeps
-- cursors good).
INSERT INTO meta VALUES ('epoch', '1') ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS api_tokens (
    name text PRIMARY KEY,
    digest text NOT NULL UNIQUE,
    role text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    last_used_at timestamptz
);
CREATE TABLE IF NOT EXISTS audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL,
    action text NOT NULL,
    who text,
    remote text,
    task_id bigint,
    detail text NOT NULL DEFAULT ''
);
"""

_COLUMNS = (
    "id", "app", "env", "action", "command", "status", "created_at", "started_at", "finished_at",
    "pid", "exit_code", "signal", "created_by", "killed_by", "marker", "created_seq", "state_seq",
    "output_size", "conf_commit", "stdout", "variable_names", "kill_signal",
)  # fmt: skip
_ENDED = [status.value for status in TaskStatus if status.ended]
_NOT_ENDED = [status.value for status in TaskStatus if not status.ended]
_GOING = [status.value for status in TaskStatus if status.going]
_ONE_GOING = "tasks_one_going"
# The lease connection notices a dead link within seconds, not the kernel's two hours: its
# lock must go with a host that is gone, not only with a process. Both ends: the client's
# socket (libpq's settings), and the server's, which holds the lock until it sees the session
# is dead (the server's settings for this session).
_LEASE_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
    "-c tcp_user_timeout=10000",
}
_TAKE_LEASE = "SELECT pg_advisory_lock(hashtextextended(%s, 0))"
_TRY_LEASE = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
# How long a lease stays free before its instance is taken for dead: long enough for a live
# one to take it again after losing its connection, short enough to interrupt within seconds.
SWEEP_GRACE = 1.5
_END_LEASE = "SELECT pg_advisory_unlock(hashtextextended(%s, 0))"
# The most bytes of output in one row of output_chunks.
CHUNK = 256 * 1024
# What a task is read with: its row's columns, and the size of its stdout shipped.
_READ = (*_COLUMNS, "stdout_size")
_SELECT = sql.SQL("SELECT {} FROM tasks").format(sql.SQL(", ").join(map(sql.Identifier, _READ)))
# A task's row as it is now; its event numbers are written with its events (a save that
# comes before an event's number reached the task must not undo it), its output's size as
# its output is shipped, its owner at its start.
UPSERT = sql.SQL("INSERT INTO tasks ({}, owner) VALUES ({}, %s) ON CONFLICT (id) DO UPDATE SET {}").format(
    sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
    sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
    sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
        for c in _COLUMNS[1:]
        if c not in ("created_seq", "state_seq", "output_size")
    ),
)
_SELECT_TOKENS = "SELECT name, role, created_at, expires_at, last_used_at FROM api_tokens"
_LAST = 1 << 62  # beyond any id


def pg_row(task: Task, owner: str | None) -> tuple[Any, ...]:
    """The values of a task's row, in the order of UPSERT's columns."""
    fields = fields_of(task)
    fields["command"] = Jsonb(fields["command"])
    fields["variable_names"] = Jsonb(fields["variable_names"])
    return (*(fields[name] for name in _COLUMNS), owner)


def instance_id(data_dir: Path) -> str:
    """This instance's name among those sharing the database: made once, kept in its data
    directory, so that a restart knows the tasks it ran."""
    path = data_dir / "instance"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        path.write_text(name + "\n")
        return name


def shown_dsn(dsn: str) -> str:
    """The database's address as it may be logged: never its password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password=)\S+", r"\1***", dsn))


class PgStore:
    def __init__(self, dsn: str, data_dir: Path) -> None:
        self.dsn = dsn
        self.logs = LogFiles(data_dir)
        self.instance: str | None = None  # known at open
        self.base = 0  # the high half of every cursor (the epoch's), known at open
        # Told after each commit that numbered events (the feed reads them at once).
        self.on_events: Callable[[], None] | None = None
        self._conn: Connection | None = None
        self._lease: Connection | None = None
        self._free_since: dict[str, float] = {}  # owners whose lease was found free, and since when
        # Every statement, in order: (what to run on the connection, who awaits its result).
        self._jobs: asyncio.Queue[
            tuple[Callable[[Connection], Awaitable[Any]], asyncio.Future[Any]] | None
        ] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        # Writes asked for in this turn of the event loop, with what awaits each (if any).
        self._writes: TurnBatch[Write] = TurnBatch(self._write_batch)

    # -- the connection, and the order of statements ------------------------------------------

    def connection_name(self, role: str) -> str:
        """What pg_stat_activity shows of a connection: which instance, for what."""
        return f"pulsar-rest {self.instance} {role}"[:63]

    async def _connect(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                log.warning("the connection to %s was lost: connecting again", shown_dsn(self.dsn))
            # UTC: times come back as they went in (the API shows them with a Z).
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=10,
                options="-c timezone=UTC",
                application_name=self.connection_name("store"),
            )
        return self._conn

    async def _work(self) -> None:
        while (job := await self._jobs.get()) is not None:
            run, done = job
            try:
                result = await run(await self._connect())
            except Exception as exc:  # it goes to whoever awaits it
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(result)

    async def _call(self, run: Callable[[Connection], Awaitable[T]]) -> T:
        self._writes.flush()  # what was written before is there for it
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((run, done))
        return await done

    def _queue(
        self,
        statement: sql.Composed | sql.SQL,
        values: tuple[Any, ...],
        done: asyncio.Future[None] | None = None,
    ) -> None:
        self._writes.add((statement, values, done))

    def _write_batch(self, batch: list[Write]) -> None:
        written: asyncio.Future[list[Exception | None]] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((lambda conn: _write(conn, batch, self.base), written))
        written.add_done_callback(lambda result: _tell(batch, result))
        if self.on_events is not None and any(statement is _EVENT for statement, _, _ in batch):
            told = self.on_events
            written.add_done_callback(lambda _: told())

    # -- opening -------------------------------------------------------------------------------

    async def open(self) -> History:
        self._worker = asyncio.get_running_loop().create_task(self._work())
        try:
            self.logs.dir.mkdir(parents=True, exist_ok=True)
            self.instance = instance_id(self.logs.dir.parent)
            await self._take_lease()
            return await self._call(self._open)
        except psycopg.Error as exc:
            raise StoreError(f"--database {shown_dsn(self.dsn)}: {_first_line(exc)}") from None
        except OSError as exc:
            raise StoreError(f"--data-dir {self.logs.dir.parent}: {exc.strerror or exc}") from None

    async def _open(self, conn: Connection) -> History:
        async with conn.transaction():
            run = await _setup(conn, count_run=True)
        epoch = await (await conn.execute("SELECT value FROM meta WHERE key = 'epoch'")).fetchone()
        self.base = int(epoch[0]) << 32 if epoch else 0
        # This instance's own: what a restart recovers. The others' belong to the instances
        # that run them.
        rows = await (
            await conn.execute(
                _SELECT + sql.SQL(" WHERE status = ANY(%s) AND owner = %s ORDER BY id"),
                (_NOT_ENDED, self.instance),
            )
        ).fetchall()
        others = await (
            await conn.execute(
                _SELECT + sql.SQL(" WHERE status = ANY(%s) AND owner <> %s ORDER BY id"),
                (_NOT_ENDED, self.instance),
            )
        ).fetchall()
        counter = await (await conn.execute("SELECT seq FROM event_counter")).fetchone()
        seq = int(counter[0]) if counter else 0
        recent = await self._events_after(conn, max(0, seq - KEEP_EVENTS), KEEP_EVENTS)
        ended = await (
            await conn.execute(
                "SELECT status, sum(n)::bigint FROM task_counts WHERE status = ANY(%s) "
                "GROUP BY status HAVING sum(n) > 0",
                (_ENDED,),
            )
        ).fetchall()
        return History(
            [self._task(row) for row in rows],
            {status: n for status, n in ended},
            run,
            seq=self.base + seq,
            recent=recent,
            horizon=self.base + max(0, seq - KEEP_EVENTS),
            others=[self._task(row) for row in others],
        )

    # -- events --------------------------------------------------------------------------------

    def add_event(self, kind: EventKind, task_id: int, status: str | None) -> None:
        """Number and keep an event, in order with the writes before it (in their transaction)."""
        self._queue(_EVENT, (kind.value, task_id, status))

    def request_kill(self, task_id: int, by: str | None) -> None:
        """Ask the instance that runs a task to stop it (told at once, and at its next tick)."""
        self._queue(
            sql.SQL("UPDATE tasks SET kill_requested_by = %s WHERE id = %s AND status = ANY(%s)"),
            (by or "", task_id, _NOT_ENDED),
        )
        self._queue(sql.SQL("SELECT pg_notify(%s, 'k')"), (CHANNEL,))

    async def kill_requests(self) -> list[tuple[int, str | None]]:
        """The tasks this instance runs that another instance was asked to stop, and by whom."""

        async def read(conn: Connection) -> list[tuple[int, str | None]]:
            rows = await (
                await conn.execute(
                    "SELECT id, kill_requested_by FROM tasks WHERE status = ANY(%s) AND owner = %s "
                    "AND kill_requested_by IS NOT NULL",
                    (_NOT_ENDED, self.instance),
                )
            ).fetchall()
            return [(task_id, by or None) for task_id, by in rows]

        return await self._call(read)

    async def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        """The events numbered after the cursor `seq`, oldest first (at most `limit`)."""
        return await self._call(lambda conn: self._events_after(conn, seq - self.base, limit))

    async def _events_after(self, conn: Connection, after: int, limit: int) -> list[Event]:
        rows = await (
            await conn.execute(
                "SELECT seq, kind, task_id, status FROM events WHERE seq > %s ORDER BY seq LIMIT %s",
                (after, limit),
            )
        ).fetchall()
        return [
            Event(self.base + seq, EventKind(kind), task_id, status) for seq, kind, task_id, status in rows
        ]

    def _task(self, row: tuple[Any, ...]) -> Task:
        fields = dict(zip(_READ, row, strict=True))
        task_id = fields["id"]
        output = ChunkLog(
            self.logs.path(task_id), fields["output_size"], partial(self.read_chunks, task_id, 0)
        )
        stdout = None
        if fields["stdout"]:
            stdout = ChunkLog(
                self.logs.path(task_id, stdout=True),
                fields["stdout_size"],
                partial(self.read_chunks, task_id, 1),
            )
        return task_from(fields, output, stdout)

    # -- output --------------------------------------------------------------------------------

    def add_chunks(self, task_id: int, stream: int, start: int, chunks: list[bytes]) -> None:
        """Keep the bytes of a task's output from `start` (after the earlier ones), a row a
        chunk, and tell every instance the output's new size, once."""
        column = sql.Identifier("stdout_size" if stream else "output_size")
        for data in chunks:
            self._queue(
                sql.SQL("INSERT INTO output_chunks VALUES (%s, %s, %s, %s)"), (task_id, stream, start, data)
            )
            start += len(data)
        self._queue(sql.SQL("UPDATE tasks SET {} = %s WHERE id = %s").format(column), (start, task_id))
        self._queue(sql.SQL("SELECT pg_notify(%s, %s)"), (CHANNEL, f"o {task_id} {stream} {start}"))

    async def _take_lease(self, wait: bool = True) -> bool:
        """This instance's lease: a lock its own idle connection holds for as long as the
        instance lives. The database lets go of it when the instance dies (its socket closes),
        and then the others take its tasks for interrupted (sweep). Without `wait`, only if
        it is free now; whether it was taken."""
        lease = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=10,
            application_name=self.connection_name("lease"),
            **_LEASE_KEEPALIVE,
        )
        if wait:
            await lease.execute(_TAKE_LEASE, (self.instance,))
        else:
            taken = await (await lease.execute(_TRY_LEASE, (self.instance,))).fetchone()
            if not (taken and taken[0]):
                await lease.close()
                return False
        self._lease = lease
        return True

    async def keep_lease(self) -> None:
        """Take the lease again if its connection was lost (PostgreSQL restarted, say): the
        others wait a while before they take a free lease for a dead instance."""
        try:
            if self._lease is not None and not self._lease.closed:
                await self._lease.execute("SELECT 1")
                return
        except psycopg.Error as exc:
            log.warning("the lease's connection was lost (%s): taking the lease again", _first_line(exc))
        with contextlib.suppress(psycopg.Error):
            if self._lease is not None:
                await self._lease.close()
        self._lease = None
        # Not waiting for it: the server may hold the lost session's lock until it sees that
        # session is dead, and the feed that calls this must go on meanwhile.
        if not await self._take_lease(wait=False):
            log.warning("the lease is still held by the lost connection: taking it at the next tick")

    async def sweep(self) -> list[tuple[int, str | None, str]]:
        """Tasks of instances that are gone (their lease free for SWEEP_GRACE seconds: not one
        taking it again), recorded as interrupted, each with its numbered event: (id, marker,
        owner) of each."""

        async def sweep(conn: Connection) -> list[tuple[int, str | None, str]]:
            owners = await (
                await conn.execute(
                    "SELECT DISTINCT owner FROM tasks WHERE status = ANY(%s) AND owner <> %s",
                    (_NOT_ENDED, self.instance),
                )
            ).fetchall()
            swept: list[tuple[int, str | None, str]] = []
            now = asyncio.get_running_loop().time()
            for owner in set(self._free_since) - {owner for (owner,) in owners}:
                del self._free_since[owner]
            for (owner,) in owners:
                row = await (await conn.execute(_TRY_LEASE, (owner,))).fetchone()
                if not (row and row[0]):
                    self._free_since.pop(owner, None)
                    continue  # it lives
                await conn.execute(_END_LEASE, (owner,))
                if now - self._free_since.setdefault(owner, now) < SWEEP_GRACE:
                    continue  # free for a moment: it may be taking it again
                del self._free_since[owner]
                async with conn.transaction():
                    rows = await (
                        await conn.execute(
                            "UPDATE tasks SET status = 'interrupted', finished_at = now() "
                            "WHERE owner = %s AND status = ANY(%s) RETURNING id, marker",
                            (owner, _NOT_ENDED),
                        )
                    ).fetchall()
                    if rows:
                        changes = [(EventKind.CHANGED.value, task_id, "interrupted") for task_id, _ in rows]
                        await _number(conn, changes, self.base)
                swept += [(task_id, marker, owner) for task_id, marker in rows]
            return swept

        return await self._call(sweep)

    async def sizes(self, task_ids: list[int]) -> list[tuple[int, int, int]]:
        """The shipped size of each stream of these tasks: (id, stream, size)."""

        async def read(conn: Connection) -> list[tuple[int, int, int]]:
            query = "SELECT id, output_size, stdout_size FROM tasks WHERE id = ANY(%s)"
            rows = await (await conn.execute(query, (task_ids,))).fetchall()
            return [(task_id, stream, sizes[stream]) for task_id, *sizes in rows for stream in (0, 1)]

        return await self._call(read)

    async def read_chunks(self, task_id: int, stream: int, offset: int, end: int) -> bytes:
        """The bytes of a task's output from `offset` to `end` (fewer if not shipped yet)."""

        async def read(conn: Connection) -> bytes:
            rows = await (
                await conn.execute(
                    "SELECT start, data FROM output_chunks WHERE task_id = %s AND stream = %s "
                    "AND start > %s AND start < %s ORDER BY start",
                    (task_id, stream, offset - CHUNK, end),
                )
            ).fetchall()
            data = b"".join(bytes(chunk) for _, chunk in rows)
            first = rows[0][0] if rows else offset
            return data[max(0, offset - first) : end - first]

        return await self._call(read)

    # -- tasks ---------------------------------------------------------------------------------

    async def next_id(self) -> int:
        async def take(conn: Connection) -> int:
            row = await (await conn.execute("SELECT nextval('tasks_id_seq')")).fetchone()
            assert row is not None
            return int(row[0])

        return await self._call(take)

    def new_output(self, task_id: int, stdout: bool = False) -> OutputLog:
        return self.logs.new(task_id, stdout)

    async def add(self, task: Task) -> None:
        """Record `task`; AppEnvBusy if it would be a second one going for its app and env."""
        done = asyncio.get_running_loop().create_future()
        self._queue(UPSERT, pg_row(task, self.instance), done)
        try:
            await done
        except psycopg.errors.UniqueViolation as exc:
            if not _refused_as_busy(exc):
                raise
            holder = await self._going(task.app, task.env)
            if holder is None:  # it ended meanwhile: try again
                return await self.add(task)
            raise AppEnvBusy(holder) from None

    async def _going(self, app: str, env: str) -> Task | None:
        async def read(conn: Connection) -> Task | None:
            query = _SELECT + sql.SQL(" WHERE app = %s AND env = %s AND status = ANY(%s)")
            row = await (await conn.execute(query, (app, env, _GOING))).fetchone()
            return None if row is None else self._task(row)

        return await self._call(read)

    async def first_queued(self, app: str, env: str) -> int | None:
        """The oldest task queued for `app` and `env`, by any instance: the next to go."""

        async def read(conn: Connection) -> int | None:
            row = await (
                await conn.execute(
                    "SELECT min(id) FROM tasks WHERE app = %s AND env = %s AND status = 'queued' "
                    "AND kill_requested_by IS NULL",
                    (app, env),
                )
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._call(read)

    def save(self, task: Task) -> None:
        self._queue(UPSERT, pg_row(task, self.instance))

    async def find(self, task_ids: Iterable[int]) -> dict[int, Task]:
        wanted = list(task_ids)

        async def read(conn: Connection) -> dict[int, Task]:
            cursor = await conn.execute(_SELECT + sql.SQL(" WHERE id = ANY(%s)"), (wanted,))
            return {row[0]: self._task(row) for row in await cursor.fetchall()}

        return await self._call(read)

    async def page(self, where: TaskFilter, offset: int, limit: int) -> tuple[list[Task], int]:
        if where.created_by == "":
            return [], 0  # no one's name ('' stands for no creator in the counts)
        terms = where.terms()
        condition = sql.SQL(" AND ").join(
            sql.SQL("{} = %s").format(sql.Identifier(column)) for column, _ in terms
        ) if terms else sql.SQL("true")  # fmt: skip
        values = tuple(value for _, value in terms)

        async def read(conn: Connection) -> tuple[list[Task], int]:
            counted = sql.SQL("SELECT coalesce(sum(n), 0)::bigint FROM task_counts WHERE {}").format(
                condition
            )
            row = await (await conn.execute(counted, values)).fetchone()
            total = int(row[0]) if row else 0
            end = min(total, offset + limit)
            if offset >= end:
                return [], total
            # As in SQLite: the page's first id from an index alone, from the nearer end.
            if offset <= total - end:
                order, edge, skip = sql.SQL("DESC"), sql.SQL("<="), offset
            else:
                order, edge, skip = sql.SQL("ASC"), sql.SQL(">="), total - end
            query = _SELECT + sql.SQL(
                " WHERE {cond} AND id {edge} (SELECT id FROM tasks WHERE {cond} ORDER BY id {order} "
                "LIMIT 1 OFFSET %s) ORDER BY id {order} LIMIT %s"
            ).format(cond=condition, edge=edge, order=order)
            rows = await (await conn.execute(query, (*values, *values, skip, end - offset))).fetchall()
            if order == sql.SQL("ASC"):
                rows.reverse()
            return [self._task(row) for row in rows], total

        return await self._call(read)

    async def prune(self, keep: int | None, before: datetime | None) -> list[tuple[int, TaskStatus]]:
        async def prune(conn: Connection) -> list[tuple[int, str, bool]]:
            doomed: list[tuple[int, str, bool]] = []
            async with conn.transaction():
                if keep is not None:
                    row = await (
                        await conn.execute(
                            "SELECT coalesce(sum(n), 0)::bigint FROM task_counts WHERE status = ANY(%s)",
                            (_ENDED,),
                        )
                    ).fetchone()
                    total = int(row[0]) if row else 0
                    if total > keep:
                        cursor = await conn.execute(
                            "SELECT id, status, stdout FROM tasks WHERE status = ANY(%s) "
                            "ORDER BY id LIMIT %s",
                            (_ENDED, total - keep),
                        )
                        doomed += await cursor.fetchall()
                if before is not None:
                    # As in SQLite: the scan stops at the first task created since `before`.
                    cursor = await conn.execute(
                        "SELECT id, status, stdout FROM tasks WHERE id > %s AND status = ANY(%s) "
                        "AND id < coalesce((SELECT min(id) FROM tasks WHERE created_at >= %s), %s) "
                        "AND coalesce(finished_at, created_at) < %s ORDER BY id",
                        (doomed[-1][0] if doomed else 0, _ENDED, before, _LAST, before),
                    )
                    doomed += await cursor.fetchall()
                if doomed:
                    await conn.execute("DELETE FROM tasks WHERE id = ANY(%s)", ([d[0] for d in doomed],))
                    await conn.execute("DELETE FROM task_counts WHERE n = 0")
                # Events older than what a start reads back answer no cursor any more.
                await conn.execute(
                    "DELETE FROM events WHERE seq <= (SELECT seq FROM event_counter) - %s",
                    (2 * KEEP_EVENTS,),
                )
            return doomed

        doomed = await self._call(prune)
        # After the commit: a log is never gone while its task is still listed.
        await asyncio.to_thread(self._remove_logs, [(task_id, stdout) for task_id, _, stdout in doomed])
        return [(task_id, TaskStatus(status)) for task_id, status, _ in doomed]

    def _remove_logs(self, which: list[tuple[int, bool]]) -> None:
        for task_id, stdout in which:
            self.logs.remove(task_id, stdout)

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1"))

    # -- tokens and the audit ------------------------------------------------------------------

    async def find_token(self, token_digest: str) -> ApiToken | None:
        async def read(conn: Connection) -> ApiToken | None:
            query = sql.SQL(_SELECT_TOKENS + " WHERE digest = %s")
            row = await (await conn.execute(query, (token_digest,))).fetchone()
            return None if row is None else _token(row)

        return await self._call(read)

    def token_used(self, token_digest: str, at: datetime) -> None:
        self._queue(sql.SQL("UPDATE api_tokens SET last_used_at = %s WHERE digest = %s"), (at, token_digest))

    def add_audit(self, record: AuditRecord) -> None:
        self._queue(
            sql.SQL(
                "INSERT INTO audit (at, action, who, remote, task_id, detail) VALUES (%s, %s, %s, %s, %s, %s)"
            ),
            (record.at, record.action.value, record.who, record.remote, record.task_id, record.detail),
        )

    async def audit_page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        async def read(conn: Connection) -> tuple[list[AuditRecord], int]:
            rows = await (
                await conn.execute(
                    "SELECT id, at, action, who, remote, task_id, detail FROM audit ORDER BY id DESC "
                    "LIMIT %s OFFSET %s",
                    (limit, offset),
                )
            ).fetchall()
            total = await (await conn.execute("SELECT count(*) FROM audit")).fetchone()
            records = [
                AuditRecord(AuditAction(action), who, remote, detail, task_id, at, record_id)
                for record_id, at, action, who, remote, task_id, detail in rows
            ]
            return records, int(total[0]) if total else 0

        return await self._call(read)

    async def close(self) -> None:
        if self._worker is not None:
            self._writes.flush()
            self._jobs.put_nowait(None)
            await self._worker
            self._worker = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        if self._lease is not None:
            await self._lease.close()  # the lease ends with the instance
            self._lease = None
        self.logs.close()


async def _setup(conn: Connection, count_run: bool) -> int:
    """Make or upgrade the schema (one instance at a time), and count this run when asked;
    return the run's number. In the caller's transaction: whole or not at all."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
    await conn.execute(_SCHEMA)
    row = await (await conn.execute("SELECT value FROM meta WHERE key = 'schema'")).fetchone()
    version = int(row[0]) if row else SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise StoreError(f"the database's schema {version} is newer than this pulsar-rest knows")
    await conn.execute(
        "INSERT INTO meta VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (str(SCHEMA_VERSION),),
    )
    if not count_run:
        return 0
    row = await (
        await conn.execute(
            "INSERT INTO meta VALUES ('run', '1') ON CONFLICT (key) "
            "DO UPDATE SET value = (meta.value::bigint + 1)::text RETURNING value"
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


async def _write(conn: Connection, batch: list[Write], base: int) -> list[Exception | None]:
    """The writes in one transaction; each one's error, if it failed (the others stay). Its
    events are numbered last, just before the commit: the counter's row is locked for as
    short a time as can be."""
    errors: list[Exception | None] = []
    events: list[tuple[Any, ...]] = []
    async with conn.transaction():
        for statement, values, _ in batch:
            if statement is _EVENT:
                events.append(values)
                errors.append(None)
                continue
            try:
                async with conn.transaction():  # a savepoint: a failure undoes this write only
                    await conn.execute(statement, values)
                errors.append(None)
            except psycopg.Error as exc:
                if conn.broken:
                    raise
                if not _refused_as_busy(exc):  # (that is no error: its caller answers it)
                    log.error("cannot write to the database: %s", _first_line(exc))
                errors.append(exc)
        if events:
            await _number(conn, events, base)
    return errors


async def _number(conn: Connection, events: list[tuple[Any, ...]], base: int) -> None:
    row = await (
        await conn.execute("UPDATE event_counter SET seq = seq + %s RETURNING seq", (len(events),))
    ).fetchone()
    assert row is not None
    first = int(row[0]) - len(events) + 1
    numbered = [(first + index, *event) for index, event in enumerate(events)]
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO events (seq, kind, task_id, status) VALUES (%s, %s, %s, %s)", numbered
        )
        await cursor.executemany(
            "UPDATE tasks SET created_seq = %s WHERE id = %s",
            [(base + seq, task_id) for seq, kind, task_id, _ in numbered if kind == EventKind.CREATED.value],
        )
        await cursor.executemany(
            "UPDATE tasks SET state_seq = %s WHERE id = %s",
            [(base + seq, task_id) for seq, kind, task_id, _ in numbered if kind == EventKind.CHANGED.value],
        )
    await conn.execute("SELECT pg_notify(%s, 'e')", (CHANNEL,))


def _tell(
    batch: list[Write],
    result: asyncio.Future[list[Exception | None]],
) -> None:
    failed = result.exception()
    if failed is not None:
        log.error("cannot write to the database: %s", _first_line(failed))
    for index, (_, _, done) in enumerate(batch):
        if done is None or done.done():
            continue  # nobody waits for it, or its caller has given up
        error = failed if failed is not None else result.result()[index]
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)


def _refused_as_busy(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == _ONE_GOING


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _token(row: tuple[Any, ...]) -> ApiToken:
    name, role, created_at, expires_at, last_used_at = row
    return ApiToken(name, Role(role), created_at, expires_at, last_used_at)


class PgTokenAdmin:
    """The API tokens in PostgreSQL, for `pulsar-rest token`, while servers run."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        async def run() -> T:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=10, options="-c timezone=UTC"
                )
            except psycopg.Error as exc:
                raise StoreError(f"--database {shown_dsn(self.dsn)}: {_first_line(exc)}") from None
            async with conn:
                async with conn.transaction():
                    await _setup(conn, count_run=False)  # the tables, if no server ran on it yet
                return await work(conn)

        return asyncio.run(run())

    def create(self, name: str, role: Role, expires_at: datetime | None) -> str:
        token = new_token()
        check_name("token", name)

        async def insert(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO api_tokens (name, digest, role, created_at, expires_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (name, digest(token), role.value, utcnow(), expires_at),
            )

        try:
            self._run(insert)
        except psycopg.errors.UniqueViolation:
            raise TokenExists(
                f"a token named {name!r} exists: revoke it first, or choose another name"
            ) from None
        return token

    def tokens(self) -> list[ApiToken]:
        async def read(conn: Connection) -> list[ApiToken]:
            rows = await (await conn.execute(sql.SQL(_SELECT_TOKENS + " ORDER BY name"))).fetchall()
            return [_token(row) for row in rows]

        return self._run(read)

    def revoke(self, name: str) -> bool:
        async def delete(conn: Connection) -> bool:
            return (await conn.execute("DELETE FROM api_tokens WHERE name = %s", (name,))).rowcount > 0

        return self._run(delete)

    def close(self) -> None:
        """Nothing stays open: each command has a connection of its own."""
