"""Use cases on tasks: create and start, kill, watch until the end. Ties the store, the
event bus and the runner together; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from pulsar_rest import pulsar, runner
from pulsar_rest.events import EventBus, EventKind, state_topic
from pulsar_rest.names import check_action, check_name
from pulsar_rest.store import TaskStore
from pulsar_rest.tasks import Task, TaskStatus

log = logging.getLogger(__name__)


class TaskNotFound(LookupError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"no task with id {task_id}")


class TaskEnded(RuntimeError):
    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.id} has already ended ({task.status})")


# Output waiting for the disk beyond which a task's pipe is no longer read (the task then
# waits), and below which reading resumes: memory stays bounded whatever the task writes.
BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1024 * 1024


@dataclass(frozen=True)
class RunConfig:
    pulsar_bin: str
    conf_repo: str | None
    kill_grace: float  # seconds between SIGTERM and SIGKILL
    # How long to keep reading output after the task's processes are gone: a daemon that
    # escaped the tree may hold the pipe open forever.
    drain_timeout: float = 5.0


class TaskService:
    def __init__(self, store: TaskStore, bus: EventBus, config: RunConfig) -> None:
        self._store = store
        self._bus = bus
        self._config = config
        self._children: dict[int, runner.ChildProcess] = {}
        self._kill_requested: set[int] = set()
        self._paused: set[int] = set()  # tasks whose output waits for the disk
        self._background: set[asyncio.Task[Any]] = set()

    def get(self, task_id: int) -> Task:
        task = self._store.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def tasks(self) -> Iterable[Task]:
        return iter(self._store)

    async def create(self, app: str, env: str, action: str) -> Task:
        """Record a task and start its process. Once recorded, the start goes on even if
        the caller is cancelled: a task is never left half-made."""
        check_name("app", app)
        check_name("environment", env)
        check_action(action)
        argv = pulsar.command(self._config.pulsar_bin, app, env, action, self._config.conf_repo)
        task_id = self._store.next_id()
        task = Task(
            id=task_id,
            app=app,
            env=env,
            action=action,
            command=[pulsar.redact(arg) for arg in argv],
            output=self._store.new_output(task_id),
        )
        self._store.add(task)
        self._publish(task, EventKind.CREATED)
        log.info("task %d created: %s", task.id, " ".join(task.command))
        await asyncio.shield(self._own(self._start(task, argv)))
        return task

    async def kill(self, task_id: int) -> Task:
        """Ask a task to stop (SIGTERM to its tree, SIGKILL after the grace period)."""
        task = self.get(task_id)
        if task.status.ended:
            raise TaskEnded(task)
        if task_id not in self._kill_requested:
            self._kill_requested.add(task_id)
            log.info("task %d: kill requested", task_id)
            child = self._children.get(task_id)
            if child is not None:
                self._own(child.terminate(self._config.kill_grace))
            # Without a child the start is still under way; _start sees the request.
        return task

    async def wait_ended(self, task: Task, timeout: float) -> bool:
        """Wait until `task` has ended; False if it is still going after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not task.status.ended:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await self._bus.wait(state_topic(task.id), remaining)
        return True

    async def close(self) -> None:
        """Stop every running task (recorded as killed) and wait for the bookkeeping."""
        for task_id in list(self._children):
            await self.kill(task_id)
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.kill_grace + 10)
        for leftover in list(self._background):
            leftover.cancel()
        self._store.close()

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

    async def _start(self, task: Task, argv: list[str]) -> None:
        try:
            child = await runner.spawn(argv, lambda data: self._output(task, data))
        except runner.SpawnError as exc:
            log.warning("task %d: %s", task.id, exc)
            self._output(task, f"pulsar-rest: {exc}\n".encode())
            status = TaskStatus.KILLED if task.id in self._kill_requested else TaskStatus.FAILED
            await self._end(task, status, runner.ExitStatus(None, None))
            return
        task.start(child.pid)
        self._store.save(task)
        self._publish(task, EventKind.CHANGED)
        log.info("task %d running, pid %d", task.id, child.pid)
        self._children[task.id] = child
        self._own(self._supervise(task, child))
        if task.id in self._kill_requested:
            self._own(child.terminate(self._config.kill_grace))

    def _output(self, task: Task, data: bytes) -> None:
        if task.output.feed(data):
            self._publish(task, EventKind.OUTPUT)
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

    def _publish(self, task: Task, kind: EventKind) -> None:
        event = self._bus.publish(kind, task.id, task.status.value)
        task.seq = event.seq
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
        if task.id in self._kill_requested:
            status = TaskStatus.KILLED
        elif exit_status.code != 0 or pulsar.reported_failure(task.output.tail_lines(pulsar.CLOSING_LINES)):
            status = TaskStatus.FAILED
        else:
            status = TaskStatus.FINISHED
        await self._end(task, status, exit_status)

    async def _end(self, task: Task, status: TaskStatus, exit_status: runner.ExitStatus) -> None:
        # The log is complete on disk before the task is said to have ended.
        if await task.output.close():
            self._publish(task, EventKind.OUTPUT)
        task.end(status, exit_code=exit_status.code, signal=exit_status.signal)
        self._kill_requested.discard(task.id)
        self._store.save(task)
        self._publish(task, EventKind.CHANGED)
        log.info(
            "task %d %s (exit code %s, signal %s)",
            task.id,
            status,
            exit_status.code,
            exit_status.signal,
        )
