"""`pulsar-rest run|logs|tasks|kill|apps`, the client, as a real process against a real server
that runs the fake pulsar: every exit code, output followed byte for byte (20 MB, invalid
UTF-8, through a proxy that cuts connections, across a restart of the server), Ctrl-C,
tokens that never show, JSON for scripts, colours only on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from pulsar_rest.auth.grants import Role
from pulsar_rest.store import TokenAdmin
from tests.conftest import release
from tests.serving import OPENER, ROOT, TIMEOUT, command, environ, stop, wait_for

Start = Callable[..., subprocess.Popen[str]]
PIPE = asyncio.subprocess.PIPE
LISTENING = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)/$", re.MULTILINE)
CREATED = re.compile(r"^task (\d+): (\S+)$", re.MULTILINE)
RED, RESET = b"\x1b[31m", b"\x1b[0m"  # what the fake's pulsar-fail prints its failure line in


# -- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[str]
    base: str
    data: Path
    log: Path  # pulsar-rest.log: the server's log, and its access log with --access-log

    async def get(self, path: str, token: str | None = None, body: dict[str, Any] | None = None) -> bytes:
        """GET (or POST with a body) straight to the server, never through a test's proxy;
        in a thread, so a proxy on this event loop goes on forwarding meanwhile."""
        return await asyncio.to_thread(_fetch, f"{self.base}/{path}", token, body)

    async def json(self, path: str, token: str | None = None, body: dict[str, Any] | None = None) -> Any:
        return json.loads(await self.get(path, token, body))

    async def task(self, task_id: int, token: str | None = None) -> dict[str, Any]:
        task: dict[str, Any] = await self.json(f"task/{task_id}", token)
        return task

    async def create(self, app: str, env: str, action: str, token: str | None = None) -> int:
        created = await self.json(f"{app}/{env}", token, {"action": action})
        task_id: int = created["taskId"]
        return task_id

    async def ended(self, task_id: int, token: str | None = None) -> dict[str, Any]:
        """Long-poll the task's state until it has ended, with a deadline."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                answer = await self.json(f"task/{task_id}/state?timeout=5", token)
                if answer["changed"]:
                    task: dict[str, Any] = answer["task"]
                    return task


def _fetch(url: str, token: str | None, body: dict[str, Any] | None) -> bytes:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    with OPENER.open(urllib.request.Request(url, data=data, headers=headers), timeout=TIMEOUT) as resp:
        answer: bytes = resp.read()
    return answer


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A configuration repository (a plain directory): app `web` with environments e0 to e5,
    app `api` with prod and staging; enough targets for tasks that run side by side."""
    root = tmp_path / "conf"
    for app, envs in {"web": [f"e{i}" for i in range(6)], "api": ["prod", "staging"]}.items():
        (root / "apps" / app).mkdir(parents=True)
        for env in envs:
            (root / "apps" / app / f"{env}.rb").write_text("")
    return root


@pytest.fixture
def serve(start: Start, tmp_path: Path, conf: Path, gates: Path) -> Callable[..., Server]:
    """Start the server (again: same log and data directories) and wait until it listens.
    `--shutdown-grace 0`: a stop at the end of a test does not wait for running tasks."""
    log = tmp_path / "logs" / "pulsar-rest.log"

    def serve(*args: str) -> Server:
        before = len(LISTENING.findall(log.read_text())) if log.exists() else 0
        proc = start("--config-repo", str(conf), "--shutdown-grace", "0", *args)
        found: list[tuple[str, str]] = []

        def listening() -> bool:  # this start's line, not the one of an earlier start
            found[:] = LISTENING.findall(log.read_text()) if log.exists() else []
            return len(found) > before

        wait_for(listening, proc, "the listening line")
        scheme, port = found[-1]
        return Server(proc, f"{scheme}://127.0.0.1:{port}", tmp_path / "data", log)

    return serve


@pytest.fixture
def server(serve: Callable[..., Server]) -> Server:
    return serve()


def free_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    code: int
    out: bytes
    err: str

    @property
    def created(self) -> tuple[int, str]:
        """The id and URL of the task `run` created (its first line, stdout or stderr)."""
        match = CREATED.search(self.err) or CREATED.search(self.out.decode(errors="replace"))
        assert match, (self.out, self.err)
        return int(match.group(1)), match.group(2)


class Running:
    """A client command as it runs: its stdout and stderr read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, args: Sequence[str]) -> None:
        self.proc = proc
        self.args = list(args)
        self.out = bytearray()
        self.err: list[str] = []
        self._news = asyncio.Event()
        self._readers = [asyncio.ensure_future(self._read_out()), asyncio.ensure_future(self._read_err())]

    async def _read_out(self) -> None:
        try:
            while self.proc.stdout is not None and (chunk := await self.proc.stdout.read(65536)):
                self.out += chunk
                self._news.set()
        finally:
            self._news.set()

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        try:
            while line := await self.proc.stderr.readline():
                self.err.append(line.decode())
                self._news.set()
        finally:
            self._news.set()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def created(self) -> tuple[int, str]:
        return Done(0, bytes(self.out), self.stderr).created

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait until `predicate()` holds on what the command printed so far (a condition,
        not a clock); fail if the command ends first, or at the deadline."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                self._news.clear()  # before the check: news after it wakes the wait below
                if predicate():
                    return
                if all(reader.done() for reader in self._readers):
                    raise AssertionError(f"{self.args} ended waiting for {what}: {self.stderr}")
                await self._news.wait()

    async def says(self, text: str) -> None:
        await self.until(lambda: text in self.stderr, f"{text!r} on stderr")

    async def done(self) -> Done:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*self._readers)
            code = await self.proc.wait()
        return Done(code, bytes(self.out), self.stderr)


class Client:
    """Starts client commands (`python -m pulsar_rest run ...`); kills what is left."""

    def __init__(self) -> None:
        self.started: list[Running] = []

    async def start(self, *args: str, env: dict[str, str], stdout: int | IO[Any] = PIPE) -> Running:
        proc = await asyncio.create_subprocess_exec(
            *command(*args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=PIPE
        )
        running = Running(proc, args)
        self.started.append(running)
        return running

    async def run(self, *args: str, env: dict[str, str], stdout: int | IO[Any] = PIPE) -> Done:
        return await (await self.start(*args, env=env, stdout=stdout)).done()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    made = Client()
    yield made
    for running in made.started:  # after a failure: none left for the next test
        if running.proc.returncode is None:
            running.proc.kill()
        with contextlib.suppress(Exception):
            await running.done()


def env_for(url: str, token: str | None = None, **extra: str) -> dict[str, str]:
    """The client's environment: the server's URL, the token if any, no NO_COLOR of the
    host's, and no proxy from the host for 127.0.0.1 (the client trusts the environment)."""
    env = environ(PULSAR_REST_URL=url, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    env.pop("NO_COLOR", None)
    if token:
        env["PULSAR_REST_TOKEN"] = token
    return {**env, **extra}


def one_line_error(done: Done, code: int, *fragments: str) -> None:
    assert done.code == code, (done.code, done.out, done.err)
    assert done.out == b"" and "Traceback" not in done.err
    assert done.err.startswith("pulsar-rest: ") and done.err.count("\n") == 1, done.err
    for fragment in fragments:
        assert fragment in done.err, (fragment, done.err)


# -- a proxy that cuts connections ---------------------------------------------------------


class Proxy:
    """A TCP proxy in front of the server. Its i-th connection is cut once it has passed
    cuts[i] bytes from the server (0: closed as soon as accepted), later ones pass all;
    every byte the client sent is kept in `sent`."""

    def __init__(self, upstream: str, cuts: Sequence[int] = ()) -> None:
        self.upstream = int(upstream.rsplit(":", 1)[1])
        self.cuts = list(cuts)
        self.cut = 0  # connections cut so far
        self.sent = bytearray()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        limit = self.cuts.pop(0) if self.cuts else None
        upstream: asyncio.StreamWriter | None = None
        try:
            if limit == 0:
                self.cut += 1
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream)
            pumps = [
                asyncio.ensure_future(self._pump(reader, upstream, None, record=True)),
                asyncio.ensure_future(self._pump(up_reader, writer, limit, record=False)),
            ]
            try:
                # Either side closing (or the cut) ends the connection for both.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                for pump in pumps:
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await pump
        except OSError:
            pass  # the server or the client went away: the connection ends, as a cut would
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.close()
            self._handlers.discard(me)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, limit: int | None, record: bool
    ) -> None:
        passed = 0
        while chunk := await source.read(65536):
            if record:
                self.sent += chunk
            if limit is not None and passed + len(chunk) >= limit:
                sink.write(chunk[: limit - passed])
                await sink.drain()
                self.cut += 1
                return
            passed += len(chunk)
            sink.write(chunk)
            await sink.drain()


# -- exit codes ----------------------------------------------------------------------------


async def test_run_exits_with_the_tasks_result(server: Server, client: Client, gates: Path) -> None:
    """0 finished, 1 failed (by exit code, or by pulsar's closing line), 3 --timeout reached
    with the task going on; --follow prints the output as the log has it, --wait nothing."""
    env = env_for(server.base)
    ok, fail, pulsar_fail, timed_out, variables = await asyncio.gather(
        client.run("run", "web", "e0", "ok", "--follow", env=env),
        client.run("run", "web", "e1", "fail", "--follow", env=env),
        client.run("run", "web", "e2", "pulsar-fail", "--wait", env=env),
        client.run("run", "web", "e3", "gate[t3]", "--follow", "--timeout", "2", env=env),
        client.run("run", "web", "e4", "env[WORDS]", "--var", "WORDS=hello, world", "--follow", env=env),
    )

    task_id, url = ok.created
    assert ok.code == 0, ok.err
    assert url == f"{server.base}/task/{task_id}"
    expected = b"Running ok for web on e0\nExecuted task ok for web on e0!\n"
    assert ok.out == await server.get(f"task/{task_id}/log") == expected
    assert f"task {task_id} running: following its output" in ok.err  # what it waits for
    assert f"task {task_id} finished (exit code 0)" in ok.err

    task_id, _ = fail.created
    assert fail.code == 1, fail.err
    assert fail.out == await server.get(f"task/{task_id}/log") == b"cap aborted: something broke\n"

    # pulsar v1 exits 0 when the task failed: the server's status, not the exit code, counts.
    task_id, url = pulsar_fail.created
    assert pulsar_fail.code == 1, pulsar_fail.err
    assert pulsar_fail.out == f"task {task_id}: {url}\n".encode()  # --wait: the id, no output
    assert f"task {task_id} running: waiting for its end" in pulsar_fail.err
    assert (await server.task(task_id))["status"] == "failed"

    task_id, _ = timed_out.created
    assert timed_out.code == 3, timed_out.err
    assert f"--timeout reached: task {task_id} goes on" in timed_out.err
    assert timed_out.out == b"waiting for t3\n"
    assert (await server.task(task_id))["status"] == "running"
    release(gates, "t3")  # it went on: it ends once let through
    assert (await server.ended(task_id))["status"] == "finished"

    assert variables.code == 0, variables.err
    assert json.loads(variables.out) == {"WORDS": "hello, world"}


async def test_queue_waits_behind_the_deploy_in_the_way(server: Server, client: Client, gates: Path) -> None:
    env = env_for(server.base)
    holder = await client.start("run", "web", "e0", "gate[q]", "--follow", env=env)
    await holder.says("following its output")
    holder_id, _ = holder.created

    refused = await client.run("run", "web", "e0", "ok", "--wait", env=env)
    one_line_error(refused, 64, f"busy with task {holder_id}", "queue")

    queued = await client.start("run", "web", "e0", "ok", "--queue", "--follow", env=env)
    await queued.says("queued: following its output")
    release(gates, "q")
    first, second = await holder.done(), await queued.done()
    assert (first.code, second.code) == (0, 0), (first.err, second.err)
    queued_id, _ = second.created
    assert queued_id == holder_id + 1  # the refused one made no task
    expected = b"Running ok for web on e0\nExecuted task ok for web on e0!\n"
    assert second.out == await server.get(f"task/{queued_id}/log") == expected


async def test_usage_errors_exit_64(server: Server, client: Client) -> None:
    env = env_for(server.base)
    ended = await server.create("web", "e5", "ok")
    await server.ended(ended)
    cases: dict[tuple[str, ...], str] = {
        ("run", "web"): "the following arguments are required: env, task",
        ("run", "web", "e0", "ok", "--var", "NOEQUALS"): "--var 'NOEQUALS': give NAME=VALUE",
        ("run", "nope", "e0", "ok", "--follow"): "has no app 'nope'",  # the server's 404
        ("kill", str(ended)): f"task {ended} has already ended",  # the server's 409
        ("tasks", "--mine"): "--mine: the server runs without authentication",
    }
    done = await asyncio.gather(*(client.run(*args, env=env) for args in cases))
    for result, fragment in zip(done, cases.values(), strict=True):
        one_line_error(result, 64, fragment)
    assert (await server.json("tasks"))["total"] == 1  # no usage error made a task


async def test_unreachable_server_exits_5_after_retries(client: Client) -> None:
    """Retried with back-off, each retry said on stderr, for --retry-for seconds (hidden,
    default 120), then 5."""
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    # Tries at 0, 0.5 and 1.5 s; a fourth, at 3.5 s, would be beyond 2.5 s (whatever the
    # machine's load adds to each try).
    done = await client.run("apps", "--retry-for", "2.5", env=env_for(url))
    elapsed = time.monotonic() - started
    assert done.code == 5, done.err
    waits = re.findall(r"waiting for the server \(.*\): trying again in (\S+)s", done.err)
    assert waits == ["0.5", "1"], done.err  # back-off doubles; no wait beyond --retry-for
    assert f"{url}/ cannot be reached" in done.err and "after 3 tries" in done.err
    assert elapsed < 10


# -- following output byte for byte ---------------------------------------------------------


async def test_follow_20_mb_byte_for_byte(server: Server, client: Client, tmp_path: Path) -> None:
    """20 MB (with a 2-byte character cut across every 64 KiB block of the pipe), compared
    byte for byte with /task/:id/log; then its last 2 lines."""
    env = env_for(server.base)
    path = tmp_path / "followed"
    with path.open("wb") as out:  # a file, not a pipe: no 20 MB held by the test meanwhile
        done = await client.run("run", "web", "e0", "bytes[20000000]", "--follow", env=env, stdout=out)
    assert done.code == 0, done.err
    task_id, _ = done.created
    log = await server.get(f"task/{task_id}/log")
    assert len(log) >= 20_000_000
    assert path.read_bytes() == log

    # Its lines (64 KiB + 3 bytes) are longer than the blocks --tail reads back at a time.
    tail = await client.run("logs", str(task_id), "--tail", "2", env=env)
    assert tail.code == 0, tail.err
    assert tail.out == b"".join(log.splitlines(keepends=True)[-2:])
    assert len(tail.out) == 2 * (65535 + 3)


async def test_follow_invalid_utf8_and_tail(server: Server, client: Client, gates: Path) -> None:
    """Output that is not UTF-8 is printed as the log has it (U+FFFD for the bad bytes);
    --tail N prints exactly the last N lines, a last one without newline included."""
    env = env_for(server.base)
    following = await client.start("run", "web", "e0", "utf8[u]", "--follow", env=env)
    # Following before the gate opens: the rest of the cut "é" and the bad bytes come while
    # it follows.
    await following.says("following its output")
    release(gates, "u")
    done = await following.done()
    assert done.code == 0, done.err
    task_id, _ = done.created
    log = await server.get(f"task/{task_id}/log")
    assert log == "start é end\nbad \ufffd\ufffd bytes\n\ufffd".encode()
    assert done.out == log

    lines_id = await server.create("web", "e1", "lines[50]")
    await server.ended(lines_id)
    tails = await asyncio.gather(
        client.run("logs", str(lines_id), "--tail", "2", env=env),
        client.run("logs", str(lines_id), "--tail", "1000", env=env),
        client.run("logs", str(task_id), "--tail", "2", env=env),
    )
    assert all(tail.code == 0 for tail in tails), [tail.err for tail in tails]
    assert [tail.out for tail in tails] == [
        b"Running lines[50] for web on e1\nExecuted task lines[50] for web on e1!\n",
        await server.get(f"task/{lines_id}/log"),
        "bad \ufffd\ufffd bytes\n\ufffd".encode(),
    ]


async def test_follow_resumed_through_a_proxy_that_cuts_connections(server: Server, client: Client) -> None:
    """A proxy cuts connections: at once, in the status line, in the middle of answers of
    1 MiB; the follower goes on from its last byte offset: no byte lost, none twice."""
    # 150,000 lines (1.8 MB): answers of up to 1 MiB, cut in their middle.
    task_id = await server.create("web", "e0", "lines[150000]")
    async with Proxy(server.base, cuts=[0, 20, 1_300_000, 400_000]) as proxy:
        done = await client.run(
            "logs", str(task_id), "--follow", "--url", proxy.url, env=env_for(server.base)
        )
    assert done.code == 0, done.err
    log = await server.get(f"task/{task_id}/log")
    assert done.out == log
    assert proxy.cut == 4
    assert done.err.count("waiting for the server") >= 2, done.err  # the cuts reached it


async def test_follow_resumed_across_server_restarts(
    serve: Callable[..., Server], client: Client, gates: Path
) -> None:
    """A crash: the server is killed (kill -9) while the client follows a task; the next
    server at the same address marks it interrupted, and the client, having retried, goes
    on from its offset and exits 2. Then a graceful stop, which kills the task it follows
    (shutdown): exit 2 as well. Each time, stdout is the log byte for byte."""
    port = str(free_port())
    first = serve("--port", port)
    crashed = await client.start(
        "run", "web", "e0", "gate[r1,r2]", "--follow", "--retry-for", "60", env=env_for(first.base)
    )
    await crashed.until(lambda: b"waiting for r1\n" in crashed.out, "the first line")
    release(gates, "r1")
    await crashed.until(lambda: b"waiting for r2\n" in crashed.out, "the line after the gate")
    task_id, _ = crashed.created
    first.proc.kill()
    first.proc.wait(TIMEOUT)
    try:
        await crashed.says("waiting for the server")  # it saw the server go
        second = serve("--port", port)
        assert second.base == first.base
        done = await crashed.done()
    finally:
        # The task's process outlived its server: the next one stops it (by its marker);
        # were it still there, after a failure above, it ends now rather than never.
        release(gates, "r2")
    assert done.code == 2, done.err
    assert f"task {task_id} interrupted" in done.err
    assert (await second.task(task_id))["status"] == "interrupted"
    log = await second.get(f"task/{task_id}/log")
    assert done.out == log == b"waiting for r1\npassed r1\nwaiting for r2\n"

    stopped = await client.start(
        "run", "web", "e1", "hang", "--follow", "--retry-for", "60", env=env_for(second.base)
    )
    await stopped.until(lambda: b"hanging\n" in stopped.out, "the first line")
    task_id, _ = stopped.created
    stop(second.proc)
    # Whether it saw the end before the stop or asks the next server, the same result.
    third = serve("--port", port)
    done = await stopped.done()
    assert done.code == 2, done.err
    task = await third.task(task_id)
    assert (task["status"], task["killedBy"]) == ("killed", "shutdown")
    assert done.out == await third.get(f"task/{task_id}/log") == b"hanging\n"


# -- Ctrl-C --------------------------------------------------------------------------------


async def test_ctrl_c_detaches_or_kills_with_kill_on_interrupt(server: Server, client: Client) -> None:
    """SIGINT (Ctrl-C) detaches: exit 130, the task goes on, and a line says how to follow
    it again (which works); with --kill-on-interrupt it kills the task: exit 2."""
    env = env_for(server.base)
    detaching, killing = await asyncio.gather(
        client.start("run", "web", "e0", "hang", "--follow", env=env),
        client.start("run", "web", "e1", "hang", "--follow", "--kill-on-interrupt", env=env),
    )

    async def interrupt(following: Running) -> Done:
        # The SIGINT handler is in place once it says it follows; the output printed
        # before the interrupt must then be there once, and whole.
        await following.says("following its output")
        await following.until(lambda: following.out == b"hanging\n", "the first line")
        following.proc.send_signal(signal.SIGINT)
        return await following.done()

    detached, killed = await asyncio.gather(interrupt(detaching), interrupt(killing))

    task_id, _ = detached.created
    assert detached.code == 130, detached.err
    again = f"pulsar-rest logs {task_id} --follow"
    assert f"detached: task {task_id} goes on; follow it again with: {again}" in detached.err
    assert "Traceback" not in detached.err
    assert (await server.task(task_id))["status"] == "running"

    killed_id, _ = killed.created
    assert killed.code == 2, killed.err
    assert f"killing task {killed_id}" in killed.err and f"task {killed_id} killed" in killed.err
    task = await server.task(killed_id)
    assert (task["status"], task["killSignal"]) == ("killed", "SIGTERM")

    # As it says: follow it again, and `kill` it from another client.
    resumed = await client.start(*again.split()[1:], env=env)
    await resumed.says("following its output")
    kill = await client.run("kill", str(task_id), env=env)
    assert kill.code == 0, kill.err
    assert kill.out == f"task {task_id}: killed\n".encode()
    ended = await resumed.done()
    assert ended.code == 2, ended.err
    assert ended.out == detached.out == await server.get(f"task/{task_id}/log") == b"hanging\n"


# -- tokens --------------------------------------------------------------------------------


async def test_token_from_env_or_file_never_in_argv_urls_or_logs(
    serve: Callable[..., Server], client: Client, tmp_path: Path
) -> None:
    """With token authentication: 4 without a token, with a wrong one, and for a read token
    that runs a task; the token travels in the Authorization header only (a proxy records
    what the client sent), never in the client's argv, the URLs the access log shows, the
    server's log or the client's output. --mine lists only the tasks of the token's name."""
    server = serve("--auth-provider", "token", "--access-log")
    admin = TokenAdmin(server.data)
    try:
        ci, other, viewer = (admin.create(name, role, None) for name, role in (
            ("ci", Role.WRITE), ("other", Role.WRITE), ("viewer", Role.READ)
        ))  # fmt: skip
    finally:
        admin.close()
    token_file = tmp_path / "ci.token"
    token_file.write_text(ci + "\n")

    async with Proxy(server.base) as proxy:
        nobody, wrong, reader, following = await asyncio.gather(
            client.run("apps", env=env_for(server.base)),
            client.run("apps", env=env_for(server.base, "prt_not-a-token")),
            client.run("run", "web", "e0", "ok", "--wait", env=env_for(server.base, viewer)),
            client.start("run", "web", "e1", "hang", "--follow", env=env_for(proxy.url, ci)),
        )
        for refused in (nobody, wrong, reader):
            assert refused.code == 4, refused.err
            assert refused.err.startswith("pulsar-rest: ") and refused.out == b""
        await following.says("following its output")
        # What `ps` shows of the running client: not the token (it is in its environment).
        shown = psutil.Process(following.proc.pid).cmdline()
        assert shown[-5:] == ["run", "web", "e1", "hang", "--follow"]
        assert not any(ci in arg for arg in shown)
        hang_id, _ = following.created
        their_id = await server.create("web", "e0", "ok", other)  # another token's task
        mine_via_file = await client.run(
            "run", "web", "e2", "ok", "--follow", "--token-file", str(token_file), env=env_for(proxy.url)
        )
        killed = await client.run("kill", str(hang_id), env=env_for(proxy.url, ci))
        followed = await following.done()
        mine = await client.run("tasks", "--mine", "--json", env=env_for(proxy.url, ci))
    results = [mine_via_file, killed, followed, mine]
    assert [done.code for done in results] == [0, 0, 2, 0], [done.err for done in results]
    file_id, _ = mine_via_file.created
    assert [(t["id"], t["createdBy"]) for t in json.loads(mine.out)] == [
        (file_id, "token:ci"),
        (hang_id, "token:ci"),
    ]
    assert their_id == hang_id + 1 and (await server.task(their_id, ci))["createdBy"] == "token:other"

    token = ci.encode()
    # Sent as a header, and only so: never in a request line, a query or a body.
    assert proxy.sent.count(b"Authorization: Bearer " + token) == proxy.sent.count(token) > 0
    log = server.log.read_text()
    paths = re.findall(r'"(?:GET|POST) (\S+) HTTP/1\.1"', log)
    assert f"/task/{hang_id}/output?offset=0&timeout=30" in paths  # the access log is on
    assert not any(ci in path or "***" in path for path in paths)  # nothing a URL had to hide
    assert all(token not in text for text in (log.encode(), *(d.out + d.err.encode() for d in results)))
    for running in client.started:
        assert not any(ci in arg for arg in running.args)


# -- JSON, tables and colours ----------------------------------------------------------------


async def test_tasks_and_apps_as_json_and_as_tables(server: Server, client: Client) -> None:
    env = env_for(server.base)
    first = await server.create("web", "e0", "ok")
    second = await server.create("web", "e1", "fail")
    third = await server.create("api", "prod", "ok")
    for task_id in (first, second, third):
        await server.ended(task_id)
    listed, filtered, table, apps = await asyncio.gather(
        client.run("tasks", "--json", env=env),
        client.run("tasks", "--json", "--app", "web", "--env", "e1", "--status", "failed", env=env),
        client.run("tasks", "--limit", "2", env=env),
        client.run("apps", "--json", env=env),
    )
    for done in (listed, filtered, table, apps):
        assert done.code == 0 and done.err == "", done.err

    tasks = json.loads(listed.out)
    assert [t["id"] for t in tasks] == [third, second, first]  # newest first
    assert [(t["app"], t["env"], t["action"], t["status"], t["exitCode"]) for t in tasks] == [
        ("api", "prod", "ok", "finished", 0),
        ("web", "e1", "fail", "failed", 3),
        ("web", "e0", "ok", "finished", 0),
    ]
    assert all(t["createdBy"] == "127.0.0.1" and "output" not in t for t in tasks)
    assert [t["id"] for t in json.loads(filtered.out)] == [second]

    rows = [line.split() for line in table.out.decode().splitlines()]
    assert rows[0] == ["ID", "APP/ENV", "TASK", "STATUS", "BY", "CREATED"]
    assert [row[:5] for row in rows[1:]] == [
        [str(third), "api/prod", "ok", "finished", "127.0.0.1"],
        [str(second), "web/e1", "fail", "failed", "127.0.0.1"],
    ]  # --limit 2: the newest two

    assert json.loads(apps.out) == {"api": ["prod", "staging"], "web": ["e0", "e1", "e2", "e3", "e4", "e5"]}


def _read_terminal(fd: int) -> bytes:
    """All a pty's master reads until the last writer of the terminal is gone (EIO)."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


async def on_terminal(client: Client, *args: str, env: dict[str, str]) -> tuple[Done, bytes]:
    """Run the command with its stdout a terminal; its result and what the terminal shows
    (newlines as written: the terminal's own CR before each LF removed)."""
    master, slave = pty.openpty()
    try:
        running = await client.start(*args, env=env, stdout=slave)
    finally:
        os.close(slave)  # the child's copy is then the terminal's only writer
    shown = asyncio.ensure_future(asyncio.to_thread(_read_terminal, master))
    done = await running.done()
    async with asyncio.timeout(TIMEOUT):
        return done, (await shown).replace(b"\r\n", b"\n")


async def test_colours_pass_through_a_terminal_only(server: Server, client: Client) -> None:
    env = env_for(server.base)
    task_id = await server.create("web", "e0", "pulsar-fail")
    await server.ended(task_id)
    log = await server.get(f"task/{task_id}/log")
    assert RED in log and RESET in log
    plain = log.replace(RED, b"").replace(RESET, b"")
    piped, terminal, no_color, no_color_env = await asyncio.gather(
        client.run("logs", str(task_id), env=env),
        on_terminal(client, "logs", str(task_id), env=env),
        on_terminal(client, "logs", str(task_id), "--no-color", env=env),
        on_terminal(client, "logs", str(task_id), env={**env, "NO_COLOR": "1"}),
    )
    assert piped.code == 0 and piped.out == plain
    for done, shown, expected in (
        (*terminal, log),
        (*no_color, plain),
        (*no_color_env, plain),
    ):
        assert done.code == 0, done.err
        assert shown == expected


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A fresh development key and certificate (127.0.0.1 among its names): its own CA."""
    certs = tmp_path / "ssl"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make-dev-cert"), str(certs)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    return certs


async def test_tls_verified_by_default_and_ca_cert_for_a_private_ca(
    serve: Callable[..., Server], client: Client, certs: Path
) -> None:
    crt = certs / "pulsar.local.crt"
    server = serve("--ssl-key", str(certs / "pulsar.local.key"), "--ssl-cert", str(crt))
    assert server.base.startswith("https://")
    env = env_for(server.base)
    trusted, untrusted = await asyncio.gather(
        client.run("apps", "--json", "--ca-cert", str(crt), env=env),
        client.run("apps", "--json", "--retry-for", "0", env=env),
    )
    assert trusted.code == 0, trusted.err
    assert "web" in json.loads(trusted.out)
    assert untrusted.code == 5 and untrusted.out == b""  # refused: never an answer unverified
    assert untrusted.err.startswith(f"pulsar-rest: {server.base}/: its TLS certificate is not trusted")


# -- bugs ----------------------------------------------------------------------------------


async def test_a_run_whose_answer_is_cut_creates_one_task(server: Server, client: Client) -> None:
    async with Proxy(server.base, cuts=[1]) as proxy:  # the POST reaches the server, its answer not
        done = await client.run("run", "web", "e0", "ok", "--wait", env=env_for(proxy.url))
    assert proxy.cut == 1
    listed = await server.json("tasks")
    assert listed["total"] == 1, (done.code, done.err, listed["ids"])


async def test_progress_after_a_cut_says_it_in_words(server: Server, client: Client) -> None:
    # Cut within the answer's headers, twice: aiohttp itself tries a GET once more.
    async with Proxy(server.base, cuts=[20, 20]) as proxy:
        done = await client.run("apps", env=env_for(proxy.url))
    assert done.code == 0, done.err
    [reason] = re.findall(r"waiting for the server \((.*)\): trying again", done.err)
    assert "<" not in reason and "RawResponseMessage" not in reason, reason


async def test_a_token_given_as_an_argument_is_refused_and_not_echoed(client: Client) -> None:
    done = await client.run("apps", "--token", "prt_SECRET", env=env_for(f"http://127.0.0.1:{free_port()}"))
    assert done.code == 64, done.err
    assert "prt_SECRET" not in done.err, done.err


async def test_an_untrusted_certificate_is_named_as_the_cause(client: Client, certs: Path) -> None:
    # A TLS server of the test's own (its certificate signed by no CA the client trusts):
    # the handshake is all there is to it.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "pulsar.local.crt", certs / "pulsar.local.key")

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    tls = await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)
    async with tls:
        port = tls.sockets[0].getsockname()[1]
        done = await client.run("apps", "--retry-for", "0", env=env_for(f"https://127.0.0.1:{port}"))
    assert done.code == 5, done.err
    assert "certificate" in done.err, done.err
