"""Use cases on tasks: create and start, kill, watch until the end, recover after a
restart, stop for a shutdown, prune old history. Ties the store, the event bus and the
runner together; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from pulsar_rest import confrepo, pulsar, runner
from pulsar_rest.events import Event, EventBus, EventKind, state_topic
from pulsar_rest.names import check_action, check_name
from pulsar_rest.store import AppEnvBusy, TaskFilter, TaskStore
from pulsar_rest.tasks import InvalidTransition, Task, TaskStatus, utcnow

log = logging.getLogger(__name__)


class TaskNotFound(LookupError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"no task with id {task_id}")


class TaskEnded(RuntimeError):
    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.id} has already ended ({task.status})")


class DeployBusy(RuntimeError):
    """The app and environment are being deployed: one deploy at a time for each."""

    def __init__(self, holder: Task) -> None:
        super().__init__(
            f"{holder.app}/{holder.env} is busy with task {holder.id} ({holder.status}): "
            "wait for it to end, or send queue=true to start after it"
        )
        self.task_id = holder.id


class TooBusy(RuntimeError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} tasks are running, the most --max-running allows: try again later")


class ShuttingDown(RuntimeError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down: no new task is started")


# The stream number of stdout in a task's output, when it is read apart (stderr is 0).
STDOUT = 1

# Output waiting for the disk beyond which a task's pipe is no longer read (the task then
# waits), and below which reading resumes: memory stays bounded whatever the task writes.
BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1024 * 1024


class NoConfigRepo(RuntimeError):
    def __init__(self) -> None:
        super().__init__("no configuration repository: start pulsar-rest with --config-repo")


@dataclass(frozen=True)
class RunConfig:
    pulsar_bin: str | None  # None: pulsar-rest's own runner on Capistrano (no pulsar installed)
    conf: confrepo.ConfigRepo | None
    kill_grace: float  # seconds between SIGTERM and SIGKILL
    # How long to keep reading output after the task's processes are gone: a daemon that
    # escaped the tree may hold the pipe open forever.
    drain_timeout: float = 5.0
    retain_tasks: int | None = None  # ended tasks kept, newest first; None: all
    retain_days: float | None = None  # days an ended task is kept; None: for ever
    max_running: int | None = None  # tasks running at once, all apps; None: no limit
    run_root: Path | None = None  # where the built-in runner makes each task's run directory


# Task variables reach the task as environment variables (pulsar v1's way of passing task
# arguments): names like shell variables, and none that would change how the task runs.
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED = ("PATH", "HOME", "RUBYOPT", "RUBYLIB", "PULSAR_CONF_REPO")
_RESERVED_PREFIXES = ("LD_", "PULSAR_REST_", "BUNDLE_", "GEM_")


class InvalidVariables(ValueError):
    pass


def check_variables(variables: object) -> dict[str, str]:
    if not isinstance(variables, dict):
        raise InvalidVariables("taskVariables must be an object of names and string values")
    if len(variables) > 100:
        raise InvalidVariables("taskVariables: 100 at most")
    for name, value in variables.items():
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
            raise InvalidVariables(f"taskVariables: {str(name)[:40]!r} is not a variable name")
        if name in _RESERVED or name.startswith(_RESERVED_PREFIXES):
            raise InvalidVariables(f"taskVariables: {name} cannot be set by a task")
        if not isinstance(value, str) or "\0" in value or len(value) > 4096:
            raise InvalidVariables(f"taskVariables: {name} must be a string (4,096 characters at most)")
        try:
            value.encode()  # what the environment holds: a lone surrogate has no bytes
        except UnicodeEncodeError:
            raise InvalidVariables(f"taskVariables: {name} is not valid Unicode text") from None
    return dict(variables)


# Environment variables whose values are never shown: a task's own variables, and names
# that look like secrets.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


def _redacted(environ: dict[str, str], variables: dict[str, str], values: set[str]) -> dict[str, str]:
    return {
        name: "***" if name in variables or _SECRET_NAME.search(name) or value in values else value
        for name, value in environ.items()
    }


# How often old history is pruned by age (by count, it is after each task's end).
PRUNE_EVERY = 3600.0
# The longest a create waits for its event to come back from a shared store (a moment,
# unless the database is down: then the answer does not wait for ever).
DELIVERY_WAIT = 5.0
# How often exited processes the server adopted from tasks are collected.
REAP_EVERY = 1.0
# Ended tasks kept in memory, the most recently ended or asked for: those a console or a
# follower asks for again and again. The others are read from the store when asked for.
RECENT = 500


class EventSink(Protocol):
    """Where creations and status changes are numbered when a store is shared by several
    instances: each instance, this one too, takes them back from there (TaskService.apply)."""

    def publish(self, kind: EventKind, task_id: int, status: str | None) -> None: ...

    def request_kill(self, task_id: int, by: str | None) -> None: ...

    async def first_queued(self, app: str, env: str) -> int | None: ...

    def output_written(self, task: Task) -> None: ...

    async def output_done(self, task: Task) -> None: ...


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        bus: EventBus,
        config: RunConfig,
        live: Iterable[Task] = (),
        ended: Mapping[str, int] | None = None,
        others: Iterable[Task] = (),
    ) -> None:
        """`live`: the tasks the store holds that have not ended (this instance's, when the
        store is shared); `ended`: how many ended tasks it holds, by status; `others`: the
        tasks other instances run. The history itself stays in the store."""
        self._store = store
        self._bus = bus
        self._config = config
        # The tasks not ended (queued, created, running), oldest first: the only ones that
        # change, and what a create and an end look through.
        self._live: dict[int, Task] = {task.id: task for task in live}
        # Tasks other instances of a shared store run, kept up by their events (apply).
        self._remote: dict[int, Task] = {task.id: task for task in others}
        self._events: EventSink | None = None  # set by share()
        self._start_seq = bus.seq  # events after it are news to this instance
        # Creations waiting for their number from the shared store (see create).
        self._numbering: dict[int, asyncio.Future[None]] = {}
        # Ended tasks recently seen, least recent first (at most RECENT).
        self._recent: collections.OrderedDict[int, Task] = collections.OrderedDict()
        # The ended tasks by status, kept up as tasks end and are pruned (the live ones are
        # counted from _live): /status and the metrics count without asking the store.
        self._ended = collections.Counter(ended or {})
        self._children: dict[int, runner.ChildProcess] = {}
        self._kill_requested: set[int] = set()
        self._paused: set[int] = set()  # tasks whose output waits for the disk
        self._background: set[asyncio.Task[Any]] = set()
        self._pruner: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        # Resolved when each running task ends: waits that go on while the bus is closed.
        self._ends: dict[int, asyncio.Event] = {}  # (events: see runner._Leader.exited)
        self._closing = False
        # For the metrics: counted since the start, read when scraped.
        self.started = 0
        self.output_bytes = 0
        self.on_end: list[Callable[[Task], None]] = []  # told of each task's end

    async def get(self, task_id: int) -> Task:
        task = await self.find(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def find(self, task_id: int) -> Task | None:
        """The task, or None if there is none (it may have been pruned)."""
        task = self._known(task_id)  # (the followers of a task ask for it many times a second)
        return task if task is not None else (await self.find_many((task_id,))).get(task_id)

    async def find_many(self, task_ids: Iterable[int]) -> dict[int, Task]:
        """The tasks of these ids that there are (some may have been pruned), by id. A task
        not ended is always the same object, which changes as the task goes on."""
        found: dict[int, Task] = {}
        missing: list[int] = []
        for task_id in task_ids:
            task = self._known(task_id)
            if task is not None:
                found[task_id] = task
            else:
                missing.append(task_id)
        if missing:
            for task_id, task in (await self._store.find(missing)).items():
                # A task that ended while the store was read is in memory, and is the same. One
                # that goes on is another instance's, met before its events: kept up from now.
                known = self._known(task_id)
                if known is None:
                    known = self._remember(task) if task.status.ended else self._track(task)
                found[task_id] = known
        return found

    async def page(self, where: TaskFilter, offset: int, limit: int) -> tuple[list[Task], int]:
        """The tasks that match, newest first, from `offset` (at most `limit`), and how many
        match in all."""
        tasks, total = await self._store.page(where, offset, limit)
        return [self._known(task.id) or task for task in tasks], total

    def _track(self, task: Task) -> Task:
        """Another instance's task, read before its events reached this one: kept up by them
        from now on, its numbers never ahead of this instance's cursor."""
        if task.state_seq > self._bus.seq:
            task.state_seq = 0
        if task.created_seq > self._bus.seq:
            task.created_seq = 0
        self._remote[task.id] = task
        return task

    def share(self, events: EventSink) -> None:
        """The store is shared with other instances: creations and changes are numbered
        there, and come back through apply() (from every instance)."""
        self._events = events

    async def apply(self, events: list[Event]) -> None:
        """Events numbered by the shared store, oldest first, from any instance: the tasks of
        other instances they name are brought up to date (read again), then each event is
        published here, its number given to its task as it is."""
        named = {event.task_id for event in events if event.task_id not in self._live}
        rows = await self._store.find(named) if named else {}
        for task_id, row in rows.items():
            if task_id in self._live:
                continue  # became this instance's meanwhile (it never does; to be sure)
            task = self._remote.get(task_id) or self._recent.get(task_id)
            news = row.created_seq > self._start_seq  # created since this instance started
            if task is None:
                task = row
                # Its numbers come with its events, as they are published here: never one
                # ahead of this instance's cursor.
                task.created_seq = task.state_seq = 0
            else:
                _refresh(task, row)
            if not task.status.ended:
                self._remote[task_id] = task
                continue
            # Counted once: when it ends under our eyes, or ends before we first see it.
            if self._remote.pop(task_id, None) is not None or (task is row and news):
                self._ended[task.status.value] += 1
            self._remember(task)
            self._next_turn(task)
        for event in events:
            task = self._known(event.task_id)
            if task is not None:
                if event.kind is EventKind.CREATED:
                    task.created_seq = event.seq
                    numbered = self._numbering.pop(task.id, None)
                    if numbered is not None and not numbered.done():
                        numbered.set_result(None)
                elif event.kind is EventKind.CHANGED:
                    task.state_seq = event.seq
            self._bus.deliver(event)

    def _next_turn(self, ended: Task) -> None:
        """`ended` (here or on another instance) held its app and environment: the oldest task
        queued here behind it starts, if nothing else holds them."""
        # Not one whose kill is under way: it is ending, though still `queued` for a moment.
        waiting = [
            t
            for t in self._live.values()
            if t.status is TaskStatus.QUEUED
            and (t.app, t.env) == (ended.app, ended.env)
            and t.id not in self._kill_requested
        ]
        if waiting and not self._closing and self._holder(ended.app, ended.env) is None:
            turn = waiting[0]
            if self._events is not None:
                self._own(self._take_shared_turn(turn, ended))
                return
            # `created` in the same step as the end, before anything is awaited: no other
            # request slips in between, it counts as running, and it is started once.
            turn.take_turn()
            self._store.save(turn)
            self._publish(turn, EventKind.CHANGED)
            log.info("task %d: its turn after task %d", turn.id, ended.id)
            self._own(self._start(turn))

    async def _take_shared_turn(self, turn: Task, ended: Task) -> None:
        """The turn of a task queued here, with a store shared by several instances: the
        oldest task queued by any of them goes first (its instance starts it when it hears of
        the end), and the database lets one at a time hold the app and env."""
        assert self._events is not None
        if await self._events.first_queued(turn.app, turn.env) != turn.id:
            return
        if turn.status is not TaskStatus.QUEUED or turn.id in self._kill_requested or self._closing:
            return  # taken meanwhile (another end's), or being killed
        turn.take_turn()
        try:
            await self._store.add(turn)
        except AppEnvBusy:
            turn.status = TaskStatus.QUEUED  # another instance's task came first
            return
        except Exception:
            # Never a task `created` for ever, holding its app and environment.
            log.exception("task %d: could not take its turn", turn.id)
            self._output(turn, b"pulsar-rest: the task could not take its turn: see the server log\n")
            await self._end(turn, TaskStatus.FAILED, runner.ExitStatus(None, None))
            return
        self._publish(turn, EventKind.CHANGED)
        log.info("task %d: its turn after task %d", turn.id, ended.id)
        self._own(self._start(turn))

    def kill_requested(self, requests: Iterable[tuple[int, str | None]]) -> None:
        """Kills asked for through other instances, of tasks this one runs."""
        for task_id, by in requests:
            if task_id in self._live and task_id not in self._kill_requested:
                self._own(self.kill(task_id, by))

    @property
    def shared(self) -> bool:
        """Whether other instances share the store (and number the events)."""
        return self._events is not None

    def live(self) -> list[Task]:
        """The tasks not ended: queued, created or running, oldest first."""
        return list(self._live.values())

    def _known(self, task_id: int) -> Task | None:
        task = self._live.get(task_id) or self._remote.get(task_id)
        if task is None:
            task = self._recent.get(task_id)
            if task is not None:
                self._recent.move_to_end(task_id)
        return task

    def _remember(self, task: Task) -> Task:
        """Keep an ended task among the recent ones (the least recently seen goes)."""
        self._recent[task.id] = task
        self._recent.move_to_end(task.id)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        return task

    async def apps(self) -> dict[str, list[str]]:
        """The apps of the configuration repository's current commit, with their environments."""
        if self._config.conf is None:
            raise NoConfigRepo()
        tree, _ = await self._config.conf.current()
        return confrepo.apps(tree)

    async def described_tasks(self) -> list[str]:
        """The tasks of the configuration repository's recipes that have a description."""
        if self._config.conf is None:
            raise NoConfigRepo()
        tree, _ = await self._config.conf.current()
        return confrepo.described_tasks(tree)

    def counts(self) -> dict[str, int]:
        """How many tasks there are of each status (only statuses some task has)."""
        going = (*self._live.values(), *self._remote.values())
        counts = collections.Counter(task.status.value for task in going)
        counts.update(self._ended)
        return {status: count for status, count in counts.items() if count}

    @property
    def running(self) -> int:
        """Tasks started and not ended (queued ones wait, they do not count)."""
        return sum(1 for task in self._live.values() if task.status.going)

    def _holder(self, app: str, env: str) -> Task | None:
        """The task deploying `app` to `env` now, if any (here or, as far as its events
        tell, on another instance)."""
        for tasks in (self._live, self._remote):
            for task in reversed(tasks.values()):
                if task.app == app and task.env == env and task.status.going:
                    return task
        return None

    async def start(self) -> None:
        """After a restart: tasks that were going when the server stopped are recorded as
        interrupted, and processes they left running are stopped. Then old history goes."""
        orphans = list(self._live.values())
        self._live.clear()
        for task in orphans:
            task.end(TaskStatus.INTERRUPTED)
            self._remember(task)
            self._ended[task.status.value] += 1
            self._store.save(task)
            self._publish(task, EventKind.CHANGED)
            log.warning("task %d was %s when the server stopped: interrupted", task.id, "running")
        markers = {task.marker for task in orphans if task.marker}
        if markers:
            stopped = await asyncio.to_thread(runner.kill_marked, markers)
            if stopped:
                log.warning("stopped %d processes left by interrupted tasks", stopped)
        await self.prune()
        loop = asyncio.get_running_loop()
        self._pruner = loop.create_task(self._prune_periodically())
        if runner.SUBREAPER.enable():
            self._reaper = loop.create_task(self._reap_periodically())
        else:
            log.warning(
                "cannot be the subreaper of tasks (prctl): each task's end looks through every "
                "process for what it left running, which costs milliseconds a task"
            )

    async def create(
        self,
        app: str,
        env: str,
        action: str,
        by: str | None = None,
        queue: bool = False,
        variables: dict[str, str] | None = None,
        stdout: bool = False,
    ) -> Task:
        """Record a task and start its process, or queue it behind the running deploy of the
        same app and environment when `queue` (else that is a DeployBusy). With `stdout`, its
        stdout is also kept on its own. Once recorded, the start goes on even if the caller is
        cancelled: a task is never left half-made."""
        if self._closing:
            raise ShuttingDown()
        check_name("app", app)
        check_name("environment", env)
        check_action(action)
        variables = check_variables(variables or {})
        tree: Path | None = None
        if self._config.conf is not None:
            tree, _ = await self._config.conf.current()  # RepoUnavailable: a 503
            confrepo.check(tree, app, env)  # a 404 before anything runs
        elif self._config.pulsar_bin is None:
            raise NoConfigRepo()
        self._admit(app, env, queue)  # a refusal spends no id
        argv = self._command(app, env, action, tree)
        task_id = await self._store.next_id()
        holder = self._admit(app, env, queue)  # again: another task may have come meanwhile
        task = Task(
            id=task_id,
            app=app,
            env=env,
            action=action,
            command=[pulsar.redact(arg) for arg in argv],
            output=self._store.new_output(task_id),
            status=TaskStatus.CREATED if holder is None else TaskStatus.QUEUED,
            created_by=by,
            marker=secrets.token_hex(8),
            variables=variables,
            stdout=self._store.new_output(task_id, stdout=True) if stdout else None,
        )
        numbered = None
        if self._events is None:
            self._register(task)  # with no await since _admit: no other task slips in between
        else:
            numbered = self._numbered(task)
        # Once it may be recorded, it is made whole even if the caller leaves meanwhile (a row
        # without its task here would hold its app and env, on every instance).
        entered = await asyncio.shield(self._own(self._enter(task, holder, queue)))
        if isinstance(entered, DeployBusy):
            self._numbering.pop(task.id, None)
            raise entered
        if numbered is not None:
            # Its creation is among this instance's events before the answer: a client that
            # asks for what was created since its cursor sees the task it has just made.
            try:
                await asyncio.wait_for(asyncio.shield(numbered), DELIVERY_WAIT)
            except TimeoutError:
                pass
            finally:
                self._numbering.pop(task.id, None)
        return task

    async def _enter(self, task: Task, holder: Task | None, queue: bool) -> DeployBusy | None:
        """Record the task, then start it or queue it behind `holder`; with a shared store, a
        DeployBusy (returned, not raised: it is the caller's answer, not a failure) if the
        database found its app and env held, and it may not queue."""
        if self._events is not None:
            try:
                holder = await self._claim(task, holder, queue)  # recorded there, whatever it is
            except DeployBusy as busy:
                return busy
            self._register(task)
        # Who asked is in the audit's line; the command, in the line of its start (or queue).
        if holder is None:
            await self._start(task)
            return None
        log.info("task %d queued behind task %d: %s", task.id, holder.id, " ".join(task.command))
        if self._events is None:
            await self._store.add(task)
        elif self._holder(task.app, task.env) is None:
            # Its holder (another instance's) may have ended while it was recorded, before it
            # was here to be given its turn.
            await self._take_shared_turn(task, holder)
        return None

    def _register(self, task: Task) -> None:
        """The new task is this instance's, and told of."""
        task.output.on_written = lambda count: self._written(task)
        self._live[task.id] = task
        if self._events is None:
            self._store.save(task)  # listed from now on: lists are the store's (a shared one has it)
        self._ends[task.id] = asyncio.Event()
        self._publish(task, EventKind.CREATED)

    def _numbered(self, task: Task) -> asyncio.Future[None]:
        """Resolved when the shared store's number of the task's creation comes back."""
        numbered = asyncio.get_running_loop().create_future()
        self._numbering[task.id] = numbered
        return numbered

    async def _claim(self, task: Task, holder: Task | None, queue: bool) -> Task | None:
        """With a store shared by several instances, the database decides: the task is
        recorded first, and refused there if another instance's holds its app and env (then
        it is a DeployBusy, or queued behind that one). The task it waits for, if any."""
        try:
            await self._store.add(task)
        except AppEnvBusy as busy:
            if not queue:
                raise DeployBusy(busy.holder) from None
            task.status = TaskStatus.QUEUED
            await self._store.add(task)
            return busy.holder
        return holder

    def _admit(self, app: str, env: str, queue: bool) -> Task | None:
        """The task a new one of `app`/`env` would wait for (None: it starts now), or why it
        cannot be made: DeployBusy (without `queue`), TooBusy."""
        holder = self._holder(app, env)
        if holder is not None and not queue:
            raise DeployBusy(holder)
        limit = self._config.max_running
        if holder is None and limit is not None and self.running >= limit:
            raise TooBusy(limit)
        return holder

    def _command(
        self, app: str, env: str, action: str, tree: Path | None, task_id: int | None = None
    ) -> list[str]:
        """The task's argv: with `tree`, the configuration repository's commit to run with."""
        config = self._config
        if config.pulsar_bin is not None:
            return pulsar.command(config.pulsar_bin, app, env, action, None if tree is None else str(tree))
        argv = [sys.executable, "-m", "pulsar_rest.capistrano", "task", app, env, action]
        argv += ["--conf-repo", str(tree)]
        if config.run_root is not None and task_id is not None:
            argv += ["--run-dir", str(self._run_dir(task_id))]
        return argv

    def _run_dir(self, task_id: int) -> Path:
        assert self._config.run_root is not None
        return self._config.run_root / str(task_id)

    async def kill(self, task_id: int, by: str | None = None) -> Task:
        """Ask a task to stop (SIGTERM to its tree, SIGKILL after the grace period)."""
        task = await self.get(task_id)
        if task.status.ended:
            raise TaskEnded(task)
        if self._events is not None and task_id not in self._live:
            # Its instance stops it: it is told through the store.
            self._events.request_kill(task_id, by)
            log.info("task %d: kill requested by %s, of its instance", task_id, by or "anonymous")
            return task
        if task_id not in self._kill_requested:
            self._kill_requested.add(task_id)
            task.killed_by = by
            self._store.save(task)
            log.info("task %d: kill requested by %s", task_id, by or "anonymous")
            child = self._children.get(task_id)
            if child is not None:
                self._own(child.terminate(self._config.kill_grace))
            elif task.status is TaskStatus.QUEUED:
                await self._end(task, TaskStatus.KILLED, runner.ExitStatus(None, None))
            # Otherwise its start is under way, and _spawn sees the request.
        return task

    async def processes(self, task_id: int, environment: bool = False) -> list[runner.ProcessInfo]:
        """The live process tree of a running task (none once it has ended); with
        `environment`, each process's environment, its secrets replaced by ***."""
        task = await self.get(task_id)
        child = self._children.get(task_id)
        if child is None or task.status.ended:
            return []
        found = await child.processes()
        secrets_ = {value for value in task.variables.values() if value}
        return [
            dataclasses.replace(
                proc, environ=_redacted(proc.environ, task.variables, secrets_) if environment else {}
            )
            for proc in found
        ]

    async def wait_ended(self, task: Task, timeout: float) -> bool:
        """Wait until `task` has ended; False if it is still going after `timeout`."""
        ended = self._ends.get(task.id)
        if self._events is not None and task.id not in self._live:
            return await self._remote_end(task, timeout)
        if ended is None or task.status.ended:
            return task.status.ended
        try:
            async with asyncio.timeout(timeout):
                await ended.wait()
        except TimeoutError:
            return False
        return True

    async def _remote_end(self, task: Task, timeout: float) -> bool:
        """Wait for the end of another instance's task, told by its events."""
        return await self._bus.wait_for(state_topic(task.id), lambda: task.status.ended, timeout)

    @property
    def accepting(self) -> bool:
        """New tasks are taken: False once the server is stopping."""
        return not self._closing

    def stop_accepting(self) -> None:
        """The server is stopping: new tasks are refused from now on."""
        self._closing = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no task is going, at most `timeout` seconds; True if none is. Queued
        tasks do not count: once the server stops accepting, they never start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for task in [task for task in self._live.values() if task.status.going]:
            if not await self.wait_ended(task, max(0.0, deadline - loop.time())):
                return False
        return True

    async def close(self) -> None:
        """Stop every running task (recorded as killed by "shutdown"), wait for the
        bookkeeping, and close the store."""
        self._closing = True
        for timer in (self._pruner, self._reaper):
            if timer is not None:
                timer.cancel()
        for task in list(self._live.values()):
            if not task.status.ended:  # it may have ended while an earlier kill was awaited
                await self.kill(task.id, by="shutdown")
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.kill_grace + 10)
        for leftover in list(self._background):
            leftover.cancel()
        await self._store.close()

    async def prune(self) -> None:
        """Remove the oldest ended tasks beyond --retain-tasks or --retain-days."""
        keep, days = self._config.retain_tasks, self._config.retain_days
        if keep is not None and days is None and sum(self._ended.values()) <= keep:
            return  # nothing to ask the store (after each task's end)
        cutoff = None if days is None else utcnow() - timedelta(days=days)
        pruned = await self._store.prune(keep, cutoff)
        for task_id, status in pruned:
            self._recent.pop(task_id, None)
            self._ended[status.value] -= 1
        if pruned:
            log.info("pruned %d old tasks (%d to %d)", len(pruned), pruned[0][0], pruned[-1][0])

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY)  # a timer, not a synchronisation
            await self.prune()

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)  # a timer, not a synchronisation
            runner.SUBREAPER.reap()

    def _own(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background, kept so it is neither collected nor forgotten."""
        bg = asyncio.get_running_loop().create_task(coro)
        self._background.add(bg)
        bg.add_done_callback(self._forget)
        return bg

    def _forget(self, bg: asyncio.Task[Any]) -> None:
        self._background.discard(bg)
        if not bg.cancelled() and bg.exception() is not None:
            log.error("background work failed", exc_info=bg.exception())

    async def _start(self, task: Task) -> None:
        try:
            await self._spawn(task)
        except Exception:
            # Whatever went wrong, the task ends: never a task `created` for ever, holding
            # its app and environment.
            log.exception("task %d: could not be started", task.id)
            if not task.status.ended and task.id not in self._children:
                self._output(task, b"pulsar-rest: the task could not be started: see the server log\n")
                await self._end(task, TaskStatus.FAILED, runner.ExitStatus(None, None))

    async def _spawn(self, task: Task) -> None:
        tree: Path | None = None
        if self._config.conf is not None:
            try:
                tree, task.conf_commit = await self._config.conf.current()
            except confrepo.RepoUnavailable as exc:
                log.warning("task %d: %s", task.id, exc)
                self._output(task, f"pulsar-rest: {exc}\n".encode())
                await self._store.add(task)
                await self._end(task, TaskStatus.FAILED, runner.ExitStatus(None, None))
                return
        argv = self._command(task.app, task.env, task.action, tree, task.id)
        task.command = [pulsar.redact(arg) for arg in argv]
        # On disk before anything runs: its id is never handed out again, even after a crash.
        # (If the store fails, _start ends the task, as for any failure to start.)
        await self._store.add(task)
        if task.id in self._kill_requested:  # killed while it was being recorded
            await self._end(task, TaskStatus.KILLED, runner.ExitStatus(None, None))
            return
        try:
            env = {**os.environ, **task.variables} if task.variables else None
            child = await runner.spawn(
                argv,
                lambda data: self._output(task, data),
                on_stdout=None if task.stdout is None else (lambda data: self._stdout(task, data)),
                marker=task.marker,
                env=env,
            )
        except runner.SpawnError as exc:
            log.warning("task %d: %s", task.id, exc)
            self._output(task, f"pulsar-rest: {exc}\n".encode())
            status = TaskStatus.KILLED if task.id in self._kill_requested else TaskStatus.FAILED
            await self._end(task, status, runner.ExitStatus(None, None))
            return
        try:
            task.start(child.pid)
        except InvalidTransition:
            # No process may outlive its task unwatched: stop it before the error goes up.
            await child.terminate(self._config.kill_grace)
            child.close()
            raise
        self._store.save(task)
        self._publish(task, EventKind.CHANGED)
        self.started += 1
        log.info("task %d running, pid %d: %s", task.id, child.pid, " ".join(task.command))
        self._children[task.id] = child
        self._own(self._supervise(task, child))
        if task.id in self._kill_requested:
            self._own(child.terminate(self._config.kill_grace))

    def _stdout(self, task: Task, data: bytes) -> None:
        """stdout kept apart: in its own log first, then in the output with the rest."""
        assert task.stdout is not None
        if not task.stdout.closed:
            task.stdout.feed(data)
        self._output(task, data, STDOUT)

    def _output(self, task: Task, data: bytes, stream: int = 0) -> None:
        if task.output.closed:
            return  # a process being stopped after its task was ended as never started
        task.output.feed(data, stream)  # published once in the file (on_written)
        self.output_bytes += len(data)
        if task.output.backlog > BACKLOG_HIGH:
            child = self._children.get(task.id)
            if child is not None and task.id not in self._paused:
                self._paused.add(task.id)
                child.pause_output()
                self._own(self._resume_output(task, child))

    async def _resume_output(self, task: Task, child: runner.ChildProcess) -> None:
        await task.output.drain(BACKLOG_LOW)
        self._paused.discard(task.id)
        child.resume_output()

    def _written(self, task: Task) -> None:
        """Output of a task this instance runs reached its log."""
        self._publish(task, EventKind.OUTPUT)
        if self._events is not None:
            self._events.output_written(task)  # for the other instances

    def output_grew(self, task_id: int, stream: int, size: int) -> None:
        """The output of another instance's task grew (as shipped to the shared store)."""
        task = self._remote.get(task_id)
        log = None if task is None else task.output if stream == 0 else task.stdout
        if task is not None and log is not None and size > log.size:
            log.size = size
            self._bus.publish(EventKind.OUTPUT, task_id, task.status.value)

    def remote_ids(self) -> list[int]:
        """The tasks other instances run, as far as this one knows."""
        return list(self._remote)

    def _publish(self, task: Task, kind: EventKind) -> None:
        if self._events is not None and kind is not EventKind.OUTPUT:
            self._events.publish(kind, task.id, task.status.value)  # numbered there
            return
        event = self._bus.publish(kind, task.id, task.status.value)
        if kind is EventKind.CREATED:
            task.created_seq = event.seq
        elif kind is EventKind.CHANGED:
            task.state_seq = event.seq

    async def _supervise(self, task: Task, child: runner.ChildProcess) -> None:
        exit_status = runner.ExitStatus(None, None)
        try:
            exit_status = await child.wait_exit()
            # Whatever the task left running in its tree goes with it, as Jenkins does.
            await child.terminate(self._config.kill_grace)
            if not await child.wait_drained(self._config.drain_timeout):
                log.warning("task %d: output pipe still open after exit, closing it", task.id)
        except Exception:
            # The task must still be recorded as ended, whatever went wrong here.
            log.exception("task %d: error while waiting for its process", task.id)
        finally:
            child.close()
            del self._children[task.id]
        kill_signal = None
        if task.id in self._kill_requested:
            status = TaskStatus.KILLED
            kill_signal = None if child.signal_sent is None else child.signal_sent.name
        elif exit_status.code != 0 or pulsar.reported_failure(task.output.tail_lines(pulsar.CLOSING_LINES)):
            status = TaskStatus.FAILED
        else:
            status = TaskStatus.FINISHED
        await self._end(task, status, exit_status, kill_signal)

    async def _end(
        self,
        task: Task,
        status: TaskStatus,
        exit_status: runner.ExitStatus,
        kill_signal: str | None = None,
    ) -> None:
        # The log is complete on disk, and the run directory gone, before the task is said to
        # have ended.
        if task.stdout is not None:
            await task.stdout.close()
        await task.output.close()
        if self._events is not None:
            await self._events.output_done(task)  # the other instances read it all before the end
        if self._config.run_root is not None:
            # The runner removes it itself, unless it was killed with SIGKILL.
            await asyncio.to_thread(shutil.rmtree, self._run_dir(task.id), True)
        task.end(status, exit_code=exit_status.code, signal=exit_status.signal, kill_signal=kill_signal)
        del self._live[task.id]
        self._remember(task)
        self._ended[task.status.value] += 1
        task.variables = {}  # its values may be secrets, and it will not run again
        self._kill_requested.discard(task.id)
        self._store.save(task)
        self._publish(task, EventKind.CHANGED)
        log.info(
            "task %d %s (exit code %s, signal %s)", task.id, status, exit_status.code, exit_status.signal
        )
        ended = self._ends.pop(task.id, None)
        if ended is not None:
            ended.set()
        for told in self.on_end:
            told(task)
        self._next_turn(task)
        if self._config.retain_tasks is not None:
            await self.prune()


# A task's fields as another instance records them; its event numbers come with its events.
_REFRESHED = tuple(
    f.name
    for f in dataclasses.fields(Task)
    if f.name not in ("id", "created_seq", "state_seq", "variables", "output", "stdout")
)


def _refresh(task: Task, row: Task) -> None:
    """Bring another instance's task up to its row, in place (waiters hold the object); its
    logs only grow (a notification of output may have come before the row was read)."""
    for name in _REFRESHED:
        setattr(task, name, getattr(row, name))
    task.output.size = max(task.output.size, row.output.size)
    if task.stdout is not None and row.stdout is not None:
        task.stdout.size = max(task.stdout.size, row.stdout.size)
