"""The task: what was asked, its state machine and its timings. Knows nothing of HTTP or processes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pulsar_rest.output import OutputLog


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"  # waits for the running deploy of the same app and environment
    CREATED = "created"  # recorded; its process is not started yet
    RUNNING = "running"  # its process was started and has not ended
    FINISHED = "finished"  # exited 0 and pulsar did not report a failure
    FAILED = "failed"  # non-zero exit, pulsar's failure line, or the process could not start
    KILLED = "killed"  # stopped on request (or by a shutdown that could not wait for it)
    INTERRUPTED = "interrupted"  # the server stopped or crashed while it ran

    @property
    def ended(self) -> bool:
        return self in _ENDED

    @property
    def going(self) -> bool:
        """Its turn has come and it has not ended: it holds its app and environment."""
        return self in (TaskStatus.CREATED, TaskStatus.RUNNING)


_ENDED = frozenset({TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.KILLED, TaskStatus.INTERRUPTED})
_ACTIVE_END = frozenset({TaskStatus.FAILED, TaskStatus.KILLED, TaskStatus.INTERRUPTED})

# The only moves a task may make; anything else is a bug and raises.
_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: _ACTIVE_END | {TaskStatus.CREATED},  # its turn has come
    TaskStatus.CREATED: _ACTIVE_END | {TaskStatus.RUNNING},
    TaskStatus.RUNNING: _ACTIVE_END | {TaskStatus.FINISHED},
    TaskStatus.FINISHED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.KILLED: frozenset(),
    TaskStatus.INTERRUPTED: frozenset(),
}


# What changes whenever anything shown of a task changes (see Task.version).
Version = tuple[int, str, int, int, str | None]


class InvalidTransition(RuntimeError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class Task:
    id: int
    app: str
    env: str
    action: str
    command: list[str]
    output: OutputLog
    created_at: datetime = field(default_factory=utcnow)
    status: TaskStatus = TaskStatus.CREATED
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None
    exit_code: int | None = None
    # Name of the signal that ended the process (e.g. "SIGKILL"), when one did.
    signal: str | None = None
    # The strongest signal pulsar-rest sent to stop it ("SIGTERM", or "SIGKILL" after the
    # grace), when it was killed: its exit code (143 after a handled SIGTERM, say) is the
    # task's own answer to it.
    kill_signal: str | None = None
    # Who asked for it and who stopped it: a user, or the client's address without
    # authentication, or "shutdown".
    created_by: str | None = None
    killed_by: str | None = None
    # The configuration repository's commit it ran with (None: not a git repository).
    conf_commit: str | None = None
    # The runner's mark on its processes, to find them again after a crash.
    marker: str | None = None
    # Its stdout alone, when asked for at its creation (for a client that parses it; the
    # merged output is then in order of arrival); None otherwise.
    stdout: OutputLog | None = None
    # Environment variables for the task (taskVariables), in memory only while it may still
    # run: values may be secrets. Their names are shown and kept in the history.
    variables: dict[str, str] = field(default_factory=dict, repr=False)
    variable_names: tuple[str, ...] = ()
    # Event numbers (cursors) of its creation and of its last status change.
    created_seq: int = 0
    state_seq: int = 0

    @property
    def version(self) -> Version:
        """Changes whenever anything shown of the task changes: its status, its output, or
        who asked for its kill (recorded before its status changes). The status itself too:
        with a shared store, its event (and number) comes back a moment after it changed."""
        stdout = -1 if self.stdout is None else self.stdout.size
        return self.state_seq, self.status.value, self.output.size, stdout, self.killed_by

    def __post_init__(self) -> None:
        if self.variables and not self.variable_names:
            self.variable_names = tuple(sorted(self.variables))

    def take_turn(self) -> None:
        """A queued task's turn has come: it holds its app and environment from now on."""
        self._move(TaskStatus.CREATED)

    def start(self, pid: int, now: datetime | None = None) -> None:
        self._move(TaskStatus.RUNNING)
        self.pid = pid
        self.started_at = now or utcnow()

    def end(
        self,
        status: TaskStatus,
        exit_code: int | None = None,
        signal: str | None = None,
        kill_signal: str | None = None,
        now: datetime | None = None,
    ) -> None:
        if not status.ended:
            raise InvalidTransition(f"task {self.id}: {status} is not an end state")
        self._move(status)
        self.exit_code = exit_code
        self.signal = signal
        self.kill_signal = kill_signal
        self.finished_at = now or utcnow()

    def _move(self, new: TaskStatus) -> None:
        if new not in _TRANSITIONS[self.status]:
            raise InvalidTransition(f"task {self.id}: {self.status} -> {new} is not allowed")
        self.status = new
