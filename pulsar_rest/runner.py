"""Child processes: spawned without a shell in a session of their own, stdout and stderr
merged at the pipe (or read apart, when stdout is wanted on its own), and stopped as a whole
tree. Knows nothing of tasks or HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

# Every child gets a unique value of this variable, which its descendants inherit: it finds
# the ones that left the process group and lost their parent (Jenkins' ProcessTreeKiller idea).
MARKER_VAR = "PULSAR_REST_RUN"

# A bigger pipe than Linux's 64 KiB default: a task that writes fast is read in larger
# chunks, with far fewer wake-ups of both sides (four to five times the throughput).
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Poll interval while waiting for processes that are not our children to disappear: they
# cannot be waited on, only looked at.
_GONE_POLL = 0.02


class SpawnError(Exception):
    """The program could not be started (not found, not executable, ...)."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int | None  # the exit code, when the process exited
    signal: str | None  # the signal's name, when a signal ended it

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode >= 0:
            return cls(returncode, None)
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"SIG{-returncode}"
        return cls(None, name)


class _Exit(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def process_exited(self) -> None:
        # Called on the leader's exit even while a descendant still holds the pipe open,
        # which Process.wait() would not notice.
        if not self.exited.done():
            self.exited.set_result(None)


class _Output(asyncio.Protocol):
    def __init__(self, on_output: Callable[[bytes], None]) -> None:
        self._on_output = on_output
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def itself(self) -> _Output:
        """The protocol factory of its pipe: the protocol exists before its pipe does."""
        return self

    def data_received(self, data: bytes) -> None:
        self._on_output(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.drained.done():
            self.drained.set_result(None)


class ChildProcess:
    """A running child and its process group."""

    def __init__(
        self,
        process: asyncio.SubprocessTransport,
        exit_protocol: _Exit,
        pipes: list[tuple[asyncio.ReadTransport, _Output]],
        marker: str,
        sweep: MarkerSweep,
    ) -> None:
        self._process = process
        self._exit = exit_protocol
        self._pipes = pipes
        self._marker = marker
        self._sweep = sweep
        self.pid: int = process.get_pid()
        # start_new_session makes the child the leader of its own group.
        self.pgid = self.pid
        # The strongest signal sent to the tree so far: SIGKILL once it came to that.
        self.signal_sent: signal.Signals | None = None

    async def wait_exit(self) -> ExitStatus:
        await asyncio.shield(self._exit.exited)
        returncode = self._process.get_returncode()
        assert returncode is not None
        return ExitStatus.from_returncode(returncode)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the output pipes are at their end; False if one is still open at `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(asyncio.gather(*(output.drained for _, output in self._pipes)))
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        for pipe, _ in self._pipes:
            pipe.close()
        self._process.close()

    def pause_output(self) -> None:
        """Stop reading the output pipes: the child blocks once a pipe is full."""
        for pipe, _ in self._pipes:
            if not pipe.is_closing():
                pipe.pause_reading()

    def resume_output(self) -> None:
        for pipe, _ in self._pipes:
            if not pipe.is_closing():
                pipe.resume_reading()

    async def terminate(self, grace: float) -> None:
        """Stop the whole tree: SIGTERM, then SIGKILL to whatever is left after `grace`.

        The tree is the process group, the leader's descendants (also those that moved to
        another group) and any process carrying this child's marker variable.
        """
        procs = await self._tree()
        if not procs:
            return
        self._signal(procs, signal.SIGTERM)
        if await self._wait_gone(procs, grace):
            return
        procs = await self._tree() | {p for p in procs if _alive(p)}
        log.info("pid %d: still running %.1fs after SIGTERM, sending SIGKILL", self.pid, grace)
        self._signal(procs, signal.SIGKILL)
        if not await self._wait_gone(procs, 5.0):
            log.error("pid %d: processes survived SIGKILL: %s", self.pid, sorted(p.pid for p in procs))

    async def processes(self) -> list[ProcessInfo]:
        """The tree as it is now (see terminate), never a process of the server's own group."""
        return await asyncio.to_thread(describe, await self._tree())

    async def _tree(self) -> set[psutil.Process]:
        # Looking through /proc takes milliseconds per hundred processes: off the event
        # loop; the costly part, every process's environment, shared with other tasks.
        near, marked = await asyncio.gather(asyncio.to_thread(self._near), self._sweep.find(self._marker))
        return {p for p in near | marked if _alive(p)}

    def _near(self) -> set[psutil.Process]:
        """The process group and the leader's descendants (those that moved to another
        group too): cheap to find, a system call or a short read per process."""
        found: set[psutil.Process] = set()
        if not self._group_lives():
            return found  # the leader is gone with its group: what is left carries the marker
        ours = os.getpgrp()
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                pgid = os.getpgid(proc.pid)
                if proc.pid != os.getpid() and pgid != ours and pgid == self.pgid:
                    found.add(proc)
        with contextlib.suppress(psutil.Error):
            found.update(psutil.Process(self.pid).children(recursive=True))
        return found

    def _group_lives(self) -> bool:
        """Some process is in the group (the leader, even unreaped, included): one call."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's group by now: look, to be sure
            return True
        return True

    def _signal(self, procs: set[psutil.Process], sig: signal.Signals) -> None:
        if self.signal_sent is not signal.SIGKILL:
            self.signal_sent = sig
        # killpg reaches members that appeared since the snapshot; only call it while a
        # snapshot member is still in the group, so a reused group id is never signalled.
        if any(_in_group(p, self.pgid) for p in procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)  # psutil checks the pid was not reused

    async def _wait_gone(self, procs: set[psutil.Process], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(_alive(p) for p in procs):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_GONE_POLL)
        return True


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    name: str
    cmdline: list[str]
    status: str
    cpu_percent: float
    rss: int  # bytes
    started: float  # seconds since the epoch
    environ: dict[str, str]


# How long CPU use is measured over: a first reading of a process says nothing.
CPU_SAMPLE = 0.1


def describe(procs: set[psutil.Process]) -> list[ProcessInfo]:
    """What each of `procs` is doing now, ordered by pid; gone ones are left out. Blocking:
    it reads /proc and waits CPU_SAMPLE seconds to measure CPU use."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(CPU_SAMPLE)  # the measure's span, not a synchronisation
    found: list[ProcessInfo] = []
    for proc in sorted(procs, key=lambda p: p.pid):
        try:
            with proc.oneshot():
                found.append(
                    ProcessInfo(
                        pid=proc.pid,
                        ppid=proc.ppid(),
                        name=proc.name(),
                        cmdline=proc.cmdline(),
                        status=proc.status(),
                        cpu_percent=proc.cpu_percent(None),
                        rss=proc.memory_info().rss,
                        started=proc.create_time(),
                        environ=_environ(proc),
                    )
                )
        except psutil.Error:
            continue  # ended meanwhile
    return found


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return dict(proc.environ())
    except (psutil.Error, OSError):
        return {}


class MarkerSweep:
    """Finds the processes that carry given markers: one look through every process's
    environment (the costly part of finding a tree: a daemon that left it is found only so)
    for everyone who asks meanwhile. Tasks that end together share one scan instead of each
    paying for its own; each scan starts after the question, so nothing started before it
    is missed."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[set[psutil.Process]]]] = {}
        self._scanning: asyncio.Task[None] | None = None

    async def find(self, marker: str) -> set[psutil.Process]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[set[psutil.Process]] = loop.create_future()
        self._waiting.setdefault(marker, []).append(answer)
        if self._scanning is None:
            self._scanning = loop.create_task(self._scan())
        return await answer

    async def _scan(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await asyncio.to_thread(marked, set(batch))
                except Exception as exc:
                    for answers in batch.values():
                        for answer in answers:
                            if not answer.done():
                                answer.set_exception(exc)
                    continue
                for marker, answers in batch.items():
                    for answer in answers:
                        if not answer.done():  # its caller may have given up
                            answer.set_result(found.get(marker, set()))
        finally:
            self._scanning = None


def marked(markers: set[str]) -> dict[str, set[psutil.Process]]:
    """The processes carrying each of `markers`, never one of the server's own group.
    Blocking: it reads every process's environment in /proc."""
    found: dict[str, set[psutil.Process]] = {}
    ours = os.getpgrp()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid == os.getpid() or os.getpgid(proc.pid) == ours:
                continue
            marker = proc.environ().get(MARKER_VAR)
            if marker in markers:
                found.setdefault(marker, set()).add(proc)
    return found


def kill_marked(markers: set[str]) -> int:
    """SIGKILL every process carrying one of `markers` (left by a server that crashed);
    return how many. Blocking: it reads /proc."""
    count = 0
    for procs in marked(markers).values():
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                count += 1
    return count


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return _alive(proc) and os.getpgid(proc.pid) == pgid
    except OSError:
        return False


def _pipe() -> tuple[int, int]:
    # Our own pipe, so its size is set before the child writes a byte.
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


async def spawn(
    argv: Sequence[str],
    on_output: Callable[[bytes], None],
    *,
    on_stdout: Callable[[bytes], None] | None = None,
    marker: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    sweep: MarkerSweep | None = None,
) -> ChildProcess:
    """Start `argv` (never through a shell); `on_output` receives stdout+stderr bytes.

    Without `on_stdout`, both go into one pipe: merged there, in the order they were
    written. With it, they are read from two pipes: `on_stdout` receives stdout, `on_output`
    stderr, each in the order of arrival, which a burst on both can reorder. `marker` (random
    if not given) marks the child and its descendants: see kill_marked."""
    loop = asyncio.get_running_loop()
    marker = marker or secrets.token_hex(8)
    child_env = dict(os.environ if env is None else env)
    child_env[MARKER_VAR] = marker
    # systemd's socket is the server's to speak on, not a deploy tool's.
    child_env.pop("NOTIFY_SOCKET", None)
    readers: list[tuple[int, _Output]] = []
    writers: list[int] = []
    try:
        out_read, out_write = _pipe()
        writers.append(out_write)
        if on_stdout is None:
            readers.append((out_read, _Output(on_output)))
            stderr: int = asyncio.subprocess.STDOUT
        else:
            readers.append((out_read, _Output(on_stdout)))
            err_read, stderr = _pipe()
            writers.append(stderr)
            readers.append((err_read, _Output(on_output)))
        exit_protocol = _Exit()
        process, _ = await loop.subprocess_exec(
            lambda: exit_protocol,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_write,
            stderr=stderr,
            start_new_session=True,
            env=child_env,
            cwd=cwd,
        )
    except OSError as exc:
        for read_fd, _ in readers:
            os.close(read_fd)
        raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    finally:
        for write_fd in writers:
            os.close(write_fd)  # the child holds its copy: EOF comes when the tree closes it
    pipes: list[tuple[asyncio.ReadTransport, _Output]] = []
    for read_fd, output in readers:
        pipe, _ = await loop.connect_read_pipe(output.itself, os.fdopen(read_fd, "rb", buffering=0))
        pipes.append((pipe, output))
    return ChildProcess(process, exit_protocol, pipes, marker, sweep or MarkerSweep())
