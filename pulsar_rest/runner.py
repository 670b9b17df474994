"""Child processes: spawned without a shell in a session of their own, stdout and stderr
merged at the pipe (or read apart, when stdout is wanted on its own), and stopped as a whole
tree. Knows nothing of tasks or HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import resource
import secrets
import signal
import subprocess
import threading
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


# The most descriptors the server makes room for at its start (see reserve_descriptors): 512
# KiB of the kernel's memory for the table.
RESERVED_DESCRIPTORS = 65536


def reserve_descriptors() -> None:
    """Grow the process's table of file descriptors to the most it may hold (up to
    RESERVED_DESCRIPTORS) now, before the first thread starts.

    Each running task holds a few descriptors (its pipes, its pidfd, its log), and the
    kernel doubles the table as they pass 256, 512, 1,024... In a process of several threads
    a growth waits for an RCU grace period (`synchronize_rcu()` in `expand_fdtable`), which
    took 10 to 20 ms here: the create that crossed 512 descriptors (the 120th running task)
    was the slowest of 200. A table never shrinks, so one growth at the start, with a
    single thread, is the last."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    size = min(soft, RESERVED_DESCRIPTORS) if soft != resource.RLIM_INFINITY else RESERVED_DESCRIPTORS
    try:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no /dev/null (a bare chroot): the table grows when needed, as it would have
    try:
        # The lowest free descriptor from size - 1 on: the table grows to hold it, and no
        # descriptor in use is touched.
        os.close(fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, size - 1))
    except OSError:
        pass  # likewise
    finally:
        os.close(null)


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


# Pids of the server's children that are task leaders, until collected (by _Leader); every
# other child in a session of its own was adopted (see Subreaper).
_LEADERS: set[int] = set()


class _Leader:
    """A started child, whose exit is collected on the event loop as soon as it happens:
    through a pidfd (Linux 5.3), else by a thread that waits for it (as asyncio does)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._loop = asyncio.get_running_loop()
        self.popen = popen
        # An event, not a future: its waiters wake in the turn after it is set, and one that
        # is cancelled leaves it as it is (a shield around a future costs a turn more).
        self.exited = asyncio.Event()
        _LEADERS.add(popen.pid)  # its exit is ours to collect, not the subreaper's
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self._pidfd = None
            threading.Thread(target=self._wait, name=f"pulsar-rest-wait-{popen.pid}", daemon=True).start()
        else:
            self._loop.add_reader(self._pidfd, self._collect)

    def _collect(self) -> None:
        # Called on the leader's exit even while a descendant still holds the pipe open.
        if self.popen.poll() is not None:
            assert self._pidfd is not None
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._exited()

    def _wait(self) -> None:
        self.popen.wait()
        self._loop.call_soon_threadsafe(self._exited)

    def _exited(self) -> None:
        _LEADERS.discard(self.popen.pid)  # collected: the pid may be anyone's now
        self.exited.set()


class _Output(asyncio.Protocol):
    def __init__(self, on_output: Callable[[bytes], None]) -> None:
        self._on_output = on_output
        self.drained = asyncio.Event()  # (an event: see _Leader.exited)

    def itself(self) -> _Output:
        """The protocol factory of its pipe: the protocol exists before its pipe does."""
        return self

    def data_received(self, data: bytes) -> None:
        self._on_output(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.drained.set()


class ChildProcess:
    """A running child and its process group."""

    def __init__(
        self, leader: _Leader, pipes: list[tuple[asyncio.ReadTransport, _Output]], marker: str
    ) -> None:
        self._leader = leader
        self._pipes = pipes
        self._marker = marker
        self.pid: int = leader.popen.pid
        # start_new_session makes the child the leader of its own group.
        self.pgid = self.pid
        # The strongest signal sent to the tree so far: SIGKILL once it came to that.
        self.signal_sent: signal.Signals | None = None

    async def wait_exit(self) -> ExitStatus:
        await self._leader.exited.wait()
        returncode = self._leader.popen.returncode
        assert returncode is not None
        return ExitStatus.from_returncode(returncode)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the output pipes are at their end; False if one is still open at `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                for _, output in self._pipes:
                    await output.drained.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Close the pipes (the leader's exit is still collected when it comes)."""
        for pipe, _ in self._pipes:
            pipe.close()

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
        if SUBREAPER.on:
            # Everything the task started is below the server: walking that part of the
            # tree is a read of a few small files, whatever runs on the machine.
            return {p for p in self._descendants() if _alive(p)}
        # Else a daemon that left the tree lives on under init: only a look through every
        # process's environment finds it (milliseconds per hundred processes: off the loop).
        return await asyncio.to_thread(self._scan)

    def _descendants(self) -> set[psutil.Process]:
        """The leader and its descendants, and what the server adopted from the task: its
        processes whose parent exited (the server being their subreaper), with theirs."""
        found: set[psutil.Process] = set()
        tops: list[int] = []
        if self._leader.popen.returncode is None:  # not collected: the pid is still the leader's
            tops.append(self.pid)
        for pid in SUBREAPER.adopted():
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == self.pgid or _marker(pid) == self._marker:
                    tops.append(pid)
        for top in tops:
            with contextlib.suppress(psutil.Error):
                found.add(psutil.Process(top))
            found.update(_below(top))
        return found

    def _scan(self) -> set[psutil.Process]:
        """The process group, the leader's descendants and whatever carries the marker,
        found by a look through every process (without a subreaper)."""
        found = marked({self._marker}).get(self._marker, set())
        ours = os.getpgrp()
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                pgid = os.getpgid(proc.pid)
                if proc.pid != os.getpid() and pgid != ours and pgid == self.pgid:
                    found.add(proc)
        with contextlib.suppress(psutil.Error):
            found.update(psutil.Process(self.pid).children(recursive=True))
        return {p for p in found if _alive(p)}

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


_PR_SET_CHILD_SUBREAPER = 36


class Subreaper:
    """The server as its tasks' subreaper (prctl PR_SET_CHILD_SUBREAPER): a process whose
    parent exits (a daemon's double fork, `cmd &` in a subshell) is adopted by the server
    instead of init. A task's processes, daemons that left its tree included, are then all
    below the server: found by reading a few small files rather than every process's
    environment, which took most of a short task's cost. The server must reap what it
    adopted: see reap()."""

    def __init__(self) -> None:
        self.on = False
        self._zombies: set[int] = set()  # adopted and dead at the last reap()

    def enable(self) -> bool:
        """Become the subreaper (once per process; True if the system allows it)."""
        if not self.on:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self.on = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            except (OSError, AttributeError):
                self.on = False
        return self.on

    def adopted(self) -> list[int]:
        """The server's children that are no task leader and not in the server's session
        (which its own helpers, git for one, share): those it adopted from tasks."""
        ours = os.getsid(0)
        found = []
        # An orphan goes to the subreaper's first live thread (the kernel's
        # find_new_reaper): the main one, the only one to read.
        server = os.getpid()
        for pid in _children(server, [str(server)]):
            if pid in _LEADERS:
                continue
            with contextlib.suppress(OSError):
                if os.getsid(pid) != ours:
                    found.append(pid)
        return found

    def reap(self) -> int:
        """Collect adopted children that have exited; return how many. A dead child is
        reaped only if it was already dead at the previous call: a child that whoever
        started it is about to collect (outside the server's session, and not a leader
        of ours) keeps its exit status for them."""
        dead = {pid for pid in self.adopted() if _state(pid) == "Z"}
        reaped = 0
        for pid in dead & self._zombies:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
        self._zombies = dead - self._zombies
        return reaped


SUBREAPER = Subreaper()


def _children(pid: int, threads: Sequence[str] | None = None) -> list[int]:
    """The pids of `pid`'s children: /proc/PID/task/TID/children, a short read per thread
    (a child belongs to the thread that forked it), of all threads or of `threads`."""
    found: list[int] = []
    try:
        threads = threads or os.listdir(f"/proc/{pid}/task")
        for tid in threads:
            try:
                found.extend(int(child) for child in _read(f"/proc/{pid}/task/{tid}/children").split())
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{pid}/task"):
                    return found  # gone
                if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                    continue  # the thread has exited
                raise
    except FileNotFoundError:
        # A kernel without CONFIG_PROC_CHILDREN: the parents of every process.
        with contextlib.suppress(psutil.Error):
            return [child.pid for child in psutil.Process(pid).children()]
    except OSError:
        pass  # gone
    return found


def _read(path: str) -> bytes:
    """A small file of /proc, read with bare system calls (no buffering, no fstat)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _below(pid: int) -> set[psutil.Process]:
    """The descendants of `pid`."""
    found: set[psutil.Process] = set()
    todo = _children(pid)
    while todo:
        child = todo.pop()
        with contextlib.suppress(psutil.Error):
            found.add(psutil.Process(child))
            todo.extend(_children(child))
    return found


def _state(pid: int) -> str:
    """The process's state letter (R, S, Z, ...), "" if it is gone."""
    try:
        return _read(f"/proc/{pid}/stat").rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return ""


_MARKER_ENTRY = MARKER_VAR.encode() + b"="


def _marker(pid: int) -> str | None:
    """The process's marker variable (read from its environment as raw bytes)."""
    with open(f"/proc/{pid}/environ", "rb") as file:
        for entry in file.read().split(b"\0"):
            if entry.startswith(_MARKER_ENTRY):
                return entry[len(_MARKER_ENTRY) :].decode(errors="replace")
    return None


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
            stderr: int = subprocess.STDOUT
        else:
            readers.append((out_read, _Output(on_stdout)))
            err_read, stderr = _pipe()
            writers.append(stderr)
            readers.append((err_read, _Output(on_output)))

        # Started on the event loop, which waits the 0.2 ms of Popen (the child is made with
        # vfork: the loop goes on once it reached exec; a scheduler trace with 20 starts in
        # flight: p50 0.15 ms, mean 0.3-0.4 ms). From a thread of its own, the loop went on
        # meanwhile, but each start cost some 80 futex calls and 1.2 ms of the server's CPU
        # more, a third of a short task: the thread's wake-ups on the other core (posix_spawn
        # from a thread, with the GIL let go, cost as much; so did a helper process). The
        # price: a program whose exec hangs (on a hung network mount) holds the whole server,
        # not only the next starts. With no await between Popen and _Leader, a started child
        # is always watched.
        popen = subprocess.Popen(  # noqa: ASYNC220 (on purpose: see above)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_write,
            stderr=stderr,
            start_new_session=True,
            env=child_env,
            cwd=cwd,
        )
        leader = _Leader(popen)
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
    return ChildProcess(leader, pipes, marker)
