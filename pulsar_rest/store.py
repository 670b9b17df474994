"""Where task history is kept: SQLite in the data directory, output in one log file per task.

The service talks to the `TaskStore` interface only, so another store (PostgreSQL shared by
several instances) replaces this one without touching it. Every database call runs in one
thread of its own, in order: a long-poll's wake-up never waits on a disk write.

The store is the history: the service holds only the tasks that have not ended, and asks
the store for the others. Lists are answered from indexes and from counts kept by triggers,
so a page costs the same whether the history holds a thousand tasks or a million.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pulsar_rest.audit import AuditAction, AuditRecord
from pulsar_rest.auth.grants import Role
from pulsar_rest.auth.tokens import ApiToken, digest, new_token
from pulsar_rest.events import Event
from pulsar_rest.names import check_name
from pulsar_rest.output import LogWriter, OutputLog
from pulsar_rest.tasks import Task, TaskStatus, utcnow
from pulsar_rest.turns import TurnBatch, run_then, settle

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "pulsar-rest.db"
LOG_DIR = "logs"
SCHEMA_VERSION = 7

# task_blocks: a block holds the ids that share all but their last _BLOCK_BITS bits, and
# each field's value is counted as this expression of the row ({row}: OLD. or NEW. in a
# trigger, nothing in a query).
_BLOCK_BITS = 12
_BLOCK_FIELDS = (("", "''"), ("app", "{row}app"), ("env", "{row}env"), ("status", "{row}status"),
                 ("created_by", "coalesce({row}created_by, '')"))  # fmt: skip


def _block_value(field: str, row: str) -> str:
    return dict(_BLOCK_FIELDS)[field].format(row=row)


# Each statement on the whole primary key of task_blocks: an IN over row values would scan it.
_UNCOUNT_BLOCK = (
    "    UPDATE task_blocks SET n = n - 1 WHERE field = '{field}' AND value = {old} AND block = {block};"
)
# One trigger a field (a status changes, the others never do in practice).
_REBLOCK = """CREATE TRIGGER IF NOT EXISTS tasks_reblocked_{field} AFTER UPDATE OF {field} ON tasks
WHEN {old} IS NOT {new} BEGIN
{uncount}
    INSERT INTO task_blocks VALUES ('{field}', {new}, NEW.id >> {bits}, 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
"""


def _uncount(field: str) -> str:
    return _UNCOUNT_BLOCK.format(
        field=field, old=_block_value(field, "OLD."), block=f"OLD.id >> {_BLOCK_BITS}"
    )


_SCHEMA_TEXT = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- AUTOINCREMENT: an id is never handed out twice, even after the newest rows are pruned.
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    env TEXT NOT NULL,
    action TEXT NOT NULL,
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    pid INTEGER,
    exit_code INTEGER,
    signal TEXT,
    created_by TEXT,
    killed_by TEXT,
    marker TEXT,
    created_seq INTEGER NOT NULL,
    state_seq INTEGER NOT NULL,
    output_size INTEGER NOT NULL DEFAULT 0,
    conf_commit TEXT,
    stdout INTEGER NOT NULL DEFAULT 0,
    variable_names TEXT NOT NULL DEFAULT '[]',
    kill_signal TEXT
);
-- Lists: each index holds every column a list filters on, so a page is read from the index
-- alone, in id order, whatever the filter (schema 6).
DROP INDEX IF EXISTS tasks_status;
CREATE INDEX IF NOT EXISTS tasks_listed ON tasks (id, app, env, status, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, id, app, env, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_app ON tasks (app, id, env, status, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_env ON tasks (env, id, app, status, created_by);
CREATE INDEX IF NOT EXISTS tasks_by_creator ON tasks (created_by, id, app, env, status);
-- How many tasks there are of each app, environment, status and creator ('' for none): a
-- list's total, and the counts of /status, without counting rows (schema 6).
CREATE TABLE IF NOT EXISTS task_counts (
    app TEXT NOT NULL,
    env TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (app, env, status, created_by)
) WITHOUT ROWID;
-- How many tasks each block of 4,096 ids holds, in all ('' '') and for each value of each
-- field a list filters on: a page deep in a long list starts from the block its first task
-- is in, not from the newest task (schema 6).
CREATE TABLE IF NOT EXISTS task_blocks (
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    block INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (field, value, block)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS tasks_counted AFTER INSERT ON tasks BEGIN
    INSERT INTO task_counts VALUES (NEW.app, NEW.env, NEW.status, coalesce(NEW.created_by, ''), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
    INSERT INTO task_blocks VALUES
        {count_blocks}
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS tasks_recounted AFTER UPDATE OF app, env, status, created_by ON tasks
WHEN (OLD.app, OLD.env, OLD.status, coalesce(OLD.created_by, ''))
    IS NOT (NEW.app, NEW.env, NEW.status, coalesce(NEW.created_by, '')) BEGIN
    UPDATE task_counts SET n = n - 1
        WHERE (app, env, status, created_by) = (OLD.app, OLD.env, OLD.status, coalesce(OLD.created_by, ''));
    INSERT INTO task_counts VALUES (NEW.app, NEW.env, NEW.status, coalesce(NEW.created_by, ''), 1)
        ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS tasks_uncounted AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET n = n - 1
        WHERE (app, env, status, created_by) = (OLD.app, OLD.env, OLD.status, coalesce(OLD.created_by, ''));
{uncount_blocks}
END;
{reblock}
-- pulsar-rest's own API tokens: only a hash of each (schema 5).
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    who TEXT,
    remote TEXT,
    task_id INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
"""
_SCHEMA = _SCHEMA_TEXT.format(
    count_blocks=",\n        ".join(
        f"('{field}', {_block_value(field, 'NEW.')}, NEW.id >> {_BLOCK_BITS}, 1)"
        for field, _ in _BLOCK_FIELDS
    ),
    uncount_blocks="\n".join(_uncount(field) for field, _ in _BLOCK_FIELDS),
    reblock="".join(
        _REBLOCK.format(
            field=field,
            old=_block_value(field, "OLD."),
            new=_block_value(field, "NEW."),
            uncount=_uncount(field),
            bits=_BLOCK_BITS,
        )
        for field, _ in _BLOCK_FIELDS[1:]
    ),
)

_COLUMNS = (
    "id, app, env, action, command, status, created_at, started_at, finished_at, pid, exit_code, "
    "signal, created_by, killed_by, marker, created_seq, state_seq, output_size, conf_commit, stdout, "
    "variable_names, kill_signal"
)
_COLUMN_NAMES = tuple(_COLUMNS.split(", "))
_STATUSES = {status.value: status for status in TaskStatus}
_ENDED = tuple(status.value for status in TaskStatus if status.ended)
_NOT_ENDED = tuple(status.value for status in TaskStatus if not status.ended)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


# Built from the constants above only: no value ever goes into the text of a statement.
_SELECT = f"SELECT {_COLUMNS} FROM tasks"  # noqa: S608
_SELECT_LIVE = f"{_SELECT} WHERE status IN ({_marks(len(_NOT_ENDED))}) ORDER BY id"
# An update, not a replacement (a delete and an insert): the triggers count it as a change.
_UPSERT = (
    f"INSERT INTO tasks ({_COLUMNS}) VALUES ({_marks(_COLUMNS.count(',') + 1)}) "  # noqa: S608
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _COLUMN_NAMES[1:])
)
# The index a list reads when it filters on this column (tasks_listed without a filter).
_INDEXES = {
    "app": "tasks_by_app",
    "env": "tasks_by_env",
    "status": "tasks_by_status",
    "created_by": "tasks_by_creator",
}
# Ids in one query of find (SQLite allows 32,766 values in a statement).
_FIND_CHUNK = 500


class StoreError(RuntimeError):
    """The data directory cannot be used: the message is one line for the user."""


class AppEnvBusy(RuntimeError):
    """A shared store refused a second task deploying the same app and environment."""

    def __init__(self, holder: Task) -> None:
        super().__init__(f"{holder.app}/{holder.env} is busy with task {holder.id}")
        self.holder = holder


@dataclass(frozen=True)
class History:
    """What a store holds at start: the tasks not ended (oldest first), how many ended
    tasks there are of each status, and this run's number."""

    live: list[Task]
    ended: dict[str, int]
    run: int
    # A store that numbers events itself (shared by several instances): the current cursor,
    # the recent events, and the oldest cursor they answer from. None: the bus numbers them.
    seq: int | None = None
    recent: list[Event] = field(default_factory=list)
    horizon: int | None = None
    others: list[Task] = field(default_factory=list)  # the tasks other instances run


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a list shows: those whose fields equal each one given."""

    app: str | None = None
    env: str | None = None
    status: str | None = None
    created_by: str | None = None

    def terms(self) -> list[tuple[str, str]]:
        """The fields given, each as its column's name and the value it must have."""
        fields = {"app": self.app, "env": self.env, "status": self.status, "created_by": self.created_by}
        return [(column, value) for column, value in fields.items() if value is not None]


class TaskStore(Protocol):
    async def open(self) -> History:
        """Open (creating it if needed) and load the tasks not ended; each open is a new run."""

    async def find(self, task_ids: Iterable[int]) -> dict[int, Task]:
        """The tasks of these ids that are in the history, by id."""

    async def page(self, where: TaskFilter, offset: int, limit: int) -> tuple[list[Task], int]:
        """The tasks that match, newest first, from `offset`, at most `limit`; and how many
        match in all."""

    async def prune(self, keep: int | None, before: datetime | None) -> list[tuple[int, TaskStatus]]:
        """Remove the oldest ended tasks beyond the newest `keep`, and those ended `before`,
        with their output; return which were removed."""

    async def next_id(self) -> int:
        """A task id never handed out before, even by an earlier run (or another instance)."""

    def new_output(self, task_id: int, stdout: bool = False) -> OutputLog:
        """The (empty) output log of a new task, or its stdout alone."""

    async def add(self, task: Task) -> None:
        """Record a new task; it is on disk when this returns."""

    def save(self, task: Task) -> None:
        """Record a change of `task` (status, pid, times, who killed it), in order, soon."""

    async def close(self) -> None:
        """Write what is pending and let go of the files."""

    async def find_token(self, token_digest: str) -> ApiToken | None:
        """The API token with this digest, if it exists (not revoked)."""

    async def ping(self) -> None:
        """Raise if the database does not answer."""

    def token_used(self, token_digest: str, at: datetime) -> None:
        """Note when a token was last used, soon."""

    def add_audit(self, record: AuditRecord) -> None:
        """Keep an audit record, in order, soon."""

    async def audit_page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        """Audit records newest first from `offset`, and how many there are."""


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _log_name(task_id: int, stdout: bool) -> str:
    return f"{task_id}.stdout.log" if stdout else f"{task_id}.log"


class LogFiles:
    """The tasks' output: one file per task in the data directory (and one for its stdout
    when kept apart), whichever database holds the history."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / LOG_DIR
        self._dir_text = str(self.dir)
        self._writer = LogWriter()

    def path(self, task_id: int, stdout: bool = False) -> Path:
        return self.dir / _log_name(task_id, stdout)

    def new(self, task_id: int, stdout: bool = False) -> OutputLog:
        return OutputLog(f"{self._dir_text}/{_log_name(task_id, stdout)}", self._writer)

    def existing(self, task_id: int, stdout: bool = False, size: int | None = None) -> OutputLog:
        """The log of a task of the history; of `size` bytes if known, else as big as its file."""
        return OutputLog(f"{self._dir_text}/{_log_name(task_id, stdout)}", None, size=size)

    def remove(self, task_id: int, stdout: bool) -> None:
        self.path(task_id).unlink(missing_ok=True)
        if stdout:
            self.path(task_id, stdout=True).unlink(missing_ok=True)

    def close(self) -> None:
        self._writer.close()


# The fields of a task that its row holds as they are.
_AS_THEY_ARE = (
    "app", "env", "action", "created_at", "started_at", "finished_at", "pid", "exit_code", "signal",
    "kill_signal", "created_by", "killed_by", "marker", "created_seq", "state_seq", "conf_commit",
)  # fmt: skip


def task_from(fields: dict[str, Any], output: OutputLog, stdout: OutputLog | None) -> Task:
    """A task of the history from its row's fields, as Python values, and its logs."""
    return Task(
        id=fields["id"],
        command=list(fields["command"]),
        output=output,
        stdout=stdout,
        status=TaskStatus(fields["status"]),
        variable_names=tuple(fields["variable_names"]),
        **{name: fields[name] for name in _AS_THEY_ARE},
    )


def fields_of(task: Task) -> dict[str, Any]:
    """The fields of a task's row, as Python values (the inverse of task_from)."""
    return {
        "id": task.id, "app": task.app, "env": task.env, "action": task.action, "command": task.command,
        "status": task.status.value, "created_at": task.created_at, "started_at": task.started_at,
        "finished_at": task.finished_at, "pid": task.pid, "exit_code": task.exit_code,
        "signal": task.signal, "created_by": task.created_by, "killed_by": task.killed_by,
        "marker": task.marker, "created_seq": task.created_seq, "state_seq": task.state_seq,
        "output_size": task.output.size, "conf_commit": task.conf_commit,
        "stdout": task.stdout is not None, "variable_names": list(task.variable_names),
        "kill_signal": task.kill_signal,
    }  # fmt: skip


def _sqlite_task(logs: LogFiles, row: tuple[Any, ...]) -> Task:
    # Unpacked in the order of _COLUMNS, without a dict of the fields: a page of a thousand
    # tasks is built from a thousand rows.
    (task_id, app, env, action, command, status, created_at, started_at, finished_at, pid, exit_code,
     signal, created_by, killed_by, marker, created_seq, state_seq, output_size, conf_commit, stdout,
     variable_names, kill_signal) = row  # fmt: skip
    status = _STATUSES[status]
    # The size recorded at its end is the log's: the end is recorded once the log is complete.
    # A task not ended may have written more since its last record (before a crash): its file
    # says how much.
    output = logs.existing(task_id, size=output_size if status.ended else None)
    return Task(
        id=task_id, app=app, env=env, action=action, command=json.loads(command), output=output,
        created_at=datetime.fromisoformat(created_at), status=status, started_at=_time(started_at),
        finished_at=_time(finished_at), pid=pid, exit_code=exit_code, signal=signal,
        kill_signal=kill_signal, created_by=created_by, killed_by=killed_by, conf_commit=conf_commit,
        marker=marker, stdout=logs.existing(task_id, stdout=True) if stdout else None,
        variable_names=() if variable_names == "[]" else tuple(json.loads(variable_names)),
        created_seq=created_seq, state_seq=state_seq,
    )  # fmt: skip


def history_rows(db: sqlite3.Connection, data_dir: Path, chunk: int) -> Iterator[list[Task]]:
    """Every task of an SQLite history (of this schema), oldest first, `chunk` at a time: a
    migration's reading."""
    logs = LogFiles(data_dir)
    try:
        cursor = db.execute(f"{_SELECT} ORDER BY id")
        while rows := cursor.fetchmany(chunk):
            yield [_sqlite_task(logs, row) for row in rows]
    finally:
        logs.close()


# A write of SQLite's: a statement and its values, or the task whose row they are (made as
# the batch goes to the thread); and what awaits it, if anything.
_Write = tuple[str, tuple[Any, ...] | Task, asyncio.Future[None] | None]


class SqliteStore:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.logs = LogFiles(data_dir)
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pulsar-rest-db")
        self._last_id = 0
        # Writes not yet handed to the thread, with what awaits each (if any).
        self._writes: TurnBatch[_Write]
        self._writes = TurnBatch(self._write_batch, one_at_a_time=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        self._writes.flush(now=True)  # what was written before is there for it
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _queue(
        self, statement: str, values: tuple[Any, ...] | Task, done: asyncio.Future[None] | None = None
    ) -> None:
        """Write in order after the earlier writes (with those asked for meanwhile)."""
        self._writes.add((statement, values, done))

    def _write_batch(self, batch: list[_Write]) -> None:
        waiting = [(index, done) for index, (_, _, done) in enumerate(batch) if done is not None]

        # A task's row is made as the batch goes to the thread, once however often the task
        # was saved in the batch (created, running, ended: a short task's often meet in one),
        # and written where it was first asked for: the row is whole, and the newest.
        writes: list[tuple[str, tuple[Any, ...]]] = []
        done_by: list[int] = []  # for each write asked for, the index of the one done for it
        rows: dict[int, int] = {}  # task id -> index of its row's write
        for statement, values, _ in batch:
            if isinstance(values, Task):
                at = rows.get(values.id)
                if at is None:
                    at = rows[values.id] = len(writes)
                    writes.append((statement, self._row(values)))
            else:
                at = len(writes)
                writes.append((statement, values))
            done_by.append(at)

        def tell(errors: list[sqlite3.Error | None] | None, failed: BaseException | None) -> None:
            try:
                if failed is not None and not waiting:
                    log.error("cannot write to %s", DB_NAME, exc_info=failed)  # nobody else to tell
                for index, done in waiting:
                    settle(done, None, failed or (errors[done_by[index]] if errors is not None else None))
            finally:
                self._writes.done()  # the next batch goes after this one's waiters are told

        run_then(self._thread, functools.partial(self._write, writes), tell)

    def _write(self, writes: list[tuple[str, tuple[Any, ...]]]) -> list[sqlite3.Error | None]:
        """The writes in one transaction; each one's error, if it failed (the others stay)."""
        db = self._connection()
        errors: list[sqlite3.Error | None] = []
        try:
            db.execute("BEGIN IMMEDIATE")  # waits for the lock, as the upgrade's
            for statement, values in writes:
                try:
                    db.execute(statement, values)
                    errors.append(None)
                except sqlite3.Error as exc:
                    log.error("cannot write to %s", DB_NAME, exc_info=exc)
                    errors.append(exc)
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return errors

    # -- opening ---------------------------------------------------------------------------

    async def open(self) -> History:
        try:
            self.logs.dir.mkdir(parents=True, exist_ok=True)
            history = await self._call(self._open)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"--data-dir {self._data_dir}: {DB_NAME} cannot be used ({exc}): restore it from a "
                "backup, or move it away to start with an empty history"
            ) from None
        except OSError as exc:
            raise StoreError(f"--data-dir {self._data_dir}: {exc.strerror or exc}") from None
        return history

    def _open(self) -> History:
        db = sqlite3.connect(self._data_dir / DB_NAME, isolation_level=None, check_same_thread=False)
        self._db = db
        # Its own user's only: it holds who did what, and the hashes of the API tokens.
        os.chmod(self._data_dir / DB_NAME, 0o600)
        # WAL: readers never wait for the writer, and a commit survives the process being
        # killed (synchronous=NORMAL loses at most the last commits on a power cut).
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        db.executescript(_SCHEMA)
        # An upgrade is whole or not at all: a crash or an error in the middle leaves the
        # database as it was. IMMEDIATE: it reads, then writes; a deferred transaction whose
        # snapshot another connection wrote after (the token command, another server) would
        # fail at once ("database is locked") instead of waiting for the lock.
        db.execute("BEGIN IMMEDIATE")
        try:
            run = self._upgrade(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        rows = db.execute(_SELECT_LIVE, _NOT_ENDED).fetchall()
        ended = db.execute(
            f"SELECT status, sum(n) FROM task_counts WHERE status IN ({_marks(len(_ENDED))}) "  # noqa: S608
            "GROUP BY status HAVING sum(n) > 0",
            _ENDED,
        ).fetchall()
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
        self._last_id = last[0] if last else 0
        return History([self._task(row) for row in rows], dict(ended), run)

    def _upgrade(self, db: sqlite3.Connection) -> int:
        """Bring the schema to this version's, and count this run; return its number."""
        version = int(self._meta("schema") or SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema {version} is newer than this pulsar-rest knows")
        if version < 2:
            db.execute("ALTER TABLE tasks ADD COLUMN conf_commit TEXT")
        if version < 3:
            db.execute("ALTER TABLE tasks ADD COLUMN stdout INTEGER NOT NULL DEFAULT 0")
            db.execute("ALTER TABLE tasks ADD COLUMN variable_names TEXT NOT NULL DEFAULT '[]'")
        if version < 4:
            db.execute("ALTER TABLE tasks ADD COLUMN kill_signal TEXT")
        if version < 6:
            # The triggers count from now on; what was there before is counted once. (A
            # crash before the commit leaves version 5, and this is done again.)
            db.execute("DELETE FROM task_counts")
            db.execute(
                "INSERT INTO task_counts SELECT app, env, status, coalesce(created_by, ''), count(*) "
                "FROM tasks GROUP BY 1, 2, 3, 4"
            )
        if version < 7:  # the block counts came a version after the counts
            db.execute("DELETE FROM task_blocks")
            for field, _ in _BLOCK_FIELDS:
                value = _block_value(field, "")
                db.execute(
                    f"INSERT INTO task_blocks SELECT '{field}', {value}, id >> {_BLOCK_BITS}, count(*) "  # noqa: S608
                    "FROM tasks GROUP BY 2, 3"
                )
        run = int(self._meta("run") or 0) + 1
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('run', ?)", (SCHEMA_VERSION, run))
        return run

    def _meta(self, key: str) -> str | None:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _task(self, row: tuple[Any, ...]) -> Task:
        return _sqlite_task(self.logs, row)

    # -- writing ---------------------------------------------------------------------------

    async def next_id(self) -> int:
        self._last_id += 1  # (without a pause: nothing happens between the call and its answer)
        return self._last_id

    def new_output(self, task_id: int, stdout: bool = False) -> OutputLog:
        return self.logs.new(task_id, stdout)

    @staticmethod
    def _row(task: Task) -> tuple[Any, ...]:
        fields = fields_of(task)
        for name in ("created_at", "started_at", "finished_at"):
            fields[name] = _iso(fields[name])
        fields["command"] = json.dumps(fields["command"])
        fields["variable_names"] = json.dumps(fields["variable_names"])
        fields["stdout"] = int(fields["stdout"])
        return tuple(fields[name] for name in _COLUMN_NAMES)

    async def add(self, task: Task) -> None:
        done = asyncio.get_running_loop().create_future()
        self._queue(_UPSERT, task, done)
        await done

    def save(self, task: Task) -> None:
        # The write follows the earlier ones; the row is the task as it is then.
        self._queue(_UPSERT, task)

    async def prune(self, keep: int | None, before: datetime | None) -> list[tuple[int, TaskStatus]]:
        return await self._call(self._prune, keep, before)

    def _prune(self, keep: int | None, before: datetime | None) -> list[tuple[int, TaskStatus]]:
        db = self._connection()
        ended = _marks(len(_ENDED))
        doomed: list[tuple[int, str, int]] = []
        if keep is not None:
            counted = f"SELECT coalesce(sum(n), 0) FROM task_counts WHERE status IN ({ended})"  # noqa: S608
            total = db.execute(counted, _ENDED).fetchone()[0]
            if total > keep:
                # Oldest first, in the order of ids (+status: not by the status index, which
                # would sort every ended task to find the oldest).
                doomed += db.execute(
                    f"SELECT id, status, stdout FROM tasks WHERE +status IN ({ended}) ORDER BY id LIMIT ?",  # noqa: S608
                    (*_ENDED, total - keep),
                ).fetchall()
        if before is not None:
            # Ids follow creation: no task created after the first one created since `before`
            # can have ended before it, so the scan stops there (not at the end of the history).
            cutoff = before.isoformat()
            doomed += db.execute(
                f"SELECT id, status, stdout FROM tasks WHERE id > ? AND status IN ({ended}) "  # noqa: S608
                "AND id < coalesce((SELECT min(id) FROM tasks WHERE created_at >= ?), 1 << 62) "
                "AND coalesce(finished_at, created_at) < ? ORDER BY id",
                (doomed[-1][0] if doomed else 0, *_ENDED, cutoff, cutoff),
            ).fetchall()
        if not doomed:
            return []
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM tasks WHERE id = ?", [(task_id,) for task_id, _, _ in doomed])
            db.execute("DELETE FROM task_counts WHERE n = 0")
            db.execute("DELETE FROM task_blocks WHERE n = 0")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # After the commit: a log is never gone while its task is still listed.
        for task_id, _, stdout in doomed:
            self.logs.remove(task_id, bool(stdout))
        return [(task_id, TaskStatus(status)) for task_id, status, _ in doomed]

    async def find(self, task_ids: Iterable[int]) -> dict[int, Task]:
        return await self._call(self._find, list(task_ids))

    def _find(self, task_ids: list[int]) -> dict[int, Task]:
        db = self._connection()
        found: dict[int, Task] = {}
        for start in range(0, len(task_ids), _FIND_CHUNK):
            chunk = task_ids[start : start + _FIND_CHUNK]
            for row in db.execute(f"{_SELECT} WHERE id IN ({_marks(len(chunk))})", chunk):
                found[row[0]] = self._task(row)
        return found

    async def page(self, where: TaskFilter, offset: int, limit: int) -> tuple[list[Task], int]:
        return await self._call(self._page, where, offset, limit)

    def _page(self, where: TaskFilter, offset: int, limit: int) -> tuple[list[Task], int]:
        if where.created_by == "":
            return [], 0  # no one's name ('' stands for no creator in the counts)
        db = self._connection()
        terms = where.terms()
        condition = " AND ".join(f"{column} = ?" for column, _ in terms) or "1"
        values = tuple(value for _, value in terms)
        if len(terms) <= 1:
            return self._page_by_blocks(terms, condition, values, offset, limit)
        # From the counts, in one pass: how many match, and how many match each term alone.
        # The list reads the index of the term that matches fewest: it skips the fewest entries.
        alone = "".join(f", sum(n) FILTER (WHERE {column} = ?)" for column, _ in terms)
        counts = db.execute(
            f"SELECT sum(n) FILTER (WHERE {condition}){alone} FROM task_counts",  # noqa: S608
            (*values, *values),
        ).fetchone()
        total = counts[0] or 0
        end = min(total, offset + limit)
        if offset >= end:
            return [], total
        index = min(((count, _INDEXES[column]) for count, (column, _) in zip(counts[1:], terms, strict=True)),
                    default=(0, "tasks_listed"))[1]  # fmt: skip
        # OFFSET steps through each entry it skips: the page's first id is found in the index
        # alone, and a page in the older half from the oldest end, so no page skips more than
        # half of what matches.
        if offset <= total - end:
            order, edge, skip = "DESC", "<=", offset
        else:
            order, edge, skip = "ASC", ">=", total - end
        tasks = f"tasks INDEXED BY {index} WHERE {condition}"
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM {tasks} AND id {edge} (SELECT id FROM {tasks} "  # noqa: S608
            f"ORDER BY id {order} LIMIT 1 OFFSET ?) ORDER BY id {order} LIMIT ?",
            (*values, *values, skip, end - offset),
        ).fetchall()
        if order == "ASC":
            rows.reverse()
        return [self._task(row) for row in rows], total

    def _page_by_blocks(
        self, terms: list[tuple[str, str]], condition: str, values: tuple[str, ...], offset: int, limit: int
    ) -> tuple[list[Task], int]:
        """A page of all tasks, or of those with one field's value: the counts of the blocks,
        newest first, say which block the page starts in, and how far into it."""
        db = self._connection()
        field, value = terms[0] if terms else ("", "")
        blocks = db.execute(
            "SELECT block, n FROM task_blocks WHERE field = ? AND value = ? AND n > 0 ORDER BY block DESC",
            (field, value),
        ).fetchall()
        total = sum(n for _, n in blocks)
        before, first = 0, None  # tasks in the blocks newer than the page's first; its block
        for block, n in blocks:
            if before + n > offset:
                first = block
                break
            before += n
        if first is None:
            return [], total
        # The page's first id is found by skipping entries of the index alone; its rows are
        # then read in id order: without a filter, straight from the table (half the time of
        # a thousand rows looked up from the index).
        index = _INDEXES[field] if terms else "tasks_listed"
        read = f"tasks INDEXED BY {index}" if terms else "tasks"
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM {read} WHERE {condition} AND id <= (SELECT id FROM tasks "  # noqa: S608
            f"INDEXED BY {index} WHERE {condition} AND id < ? ORDER BY id DESC LIMIT 1 OFFSET ?) "
            "ORDER BY id DESC LIMIT ?",
            (*values, *values, (first + 1) << _BLOCK_BITS, offset - before, limit),
        ).fetchall()
        return [self._task(row) for row in rows], total

    async def ping(self) -> None:
        await self._call(lambda: self._connection().execute("SELECT 1").fetchone())

    # -- tokens and the audit ------------------------------------------------------------

    async def find_token(self, token_digest: str) -> ApiToken | None:
        return await self._call(_find_token, self._connection(), token_digest)

    def token_used(self, token_digest: str, at: datetime) -> None:
        self._queue("UPDATE api_tokens SET last_used_at = ? WHERE digest = ?", (at.isoformat(), token_digest))

    def add_audit(self, record: AuditRecord) -> None:
        self._queue(
            "INSERT INTO audit (at, action, who, remote, task_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.at.isoformat(),
                record.action.value,
                record.who,
                record.remote,
                record.task_id,
                record.detail,
            ),
        )

    async def audit_page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        return await self._call(self._audit_page, offset, limit)

    def _audit_page(self, offset: int, limit: int) -> tuple[list[AuditRecord], int]:
        db = self._connection()
        rows = db.execute(
            "SELECT id, at, action, who, remote, task_id, detail FROM audit ORDER BY id DESC "
            "LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        total = db.execute("SELECT count(*) FROM audit").fetchone()[0]
        records = [
            AuditRecord(
                AuditAction(action), who, remote, detail, task_id, datetime.fromisoformat(at), record_id
            )
            for record_id, at, action, who, remote, task_id, detail in rows
        ]
        return records, total

    def _connection(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)
        self.logs.close()


def _find_token(db: sqlite3.Connection, token_digest: str) -> ApiToken | None:
    row = db.execute(_SELECT_TOKENS + " WHERE digest = ?", (token_digest,)).fetchone()
    return None if row is None else _token(row)


_SELECT_TOKENS = "SELECT name, role, created_at, expires_at, last_used_at FROM api_tokens"


def _token(row: tuple[Any, ...]) -> ApiToken:
    name, role, created_at, expires_at, last_used_at = row
    return ApiToken(
        name, Role(role), datetime.fromisoformat(created_at), _time(expires_at), _time(last_used_at)
    )


class TokenExists(ValueError):
    pass


class TokenAdmin:
    """The API tokens, for `pulsar-rest token`: another process than the server, on the same
    database while the server runs (SQLite's WAL lets both write)."""

    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)  # the tables, if the server never ran here
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"--data-dir {data_dir}: {DB_NAME} cannot be used ({exc})") from None

    def create(self, name: str, role: Role, expires_at: datetime | None) -> str:
        """A new token: the only time it is seen; the database keeps its digest."""
        token = new_token()
        try:
            self._db.execute(
                "INSERT INTO api_tokens (name, digest, role, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (
                    check_name("token", name),
                    digest(token),
                    role.value,
                    utcnow().isoformat(),
                    _iso(expires_at),
                ),
            )
        except sqlite3.IntegrityError:
            raise TokenExists(
                f"a token named {name!r} exists: revoke it first, or choose another name"
            ) from None
        return token

    def tokens(self) -> list[ApiToken]:
        return [_token(row) for row in self._db.execute(_SELECT_TOKENS + " ORDER BY name")]

    def revoke(self, name: str) -> bool:
        """Remove the token; False if there was none of that name."""
        return self._db.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount > 0

    def close(self) -> None:
        self._db.close()
