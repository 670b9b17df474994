"""The `pulsar-rest` command as a real process: help, one-line start-up errors, serve, SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from pulsar_rest import logfile, runner
from tests.conftest import alive
from tests.serving import ROOT, TIMEOUT, call, command, ended, environ, listening_port, stop, wait_for

FLAGS = [
    "--port", "--host", "--config-repo", "--config-branch", "--log-dir", "--ssl-key", "--ssl-cert",
    "--ssl-pfx", "--ssl-passphrase", "--ssl-min-version", "--auth-username", "--auth-password",
    "--auth-provider", "--auth-method", "--pulsar-bin", "--long-poll-timeout", "--kill-grace",
    "--config", "--debug", "--data-dir", "--keepalive", "--auth-read", "--auth-write",
    "--auth-password-file", "--auth-cache-ttl", "--allow-anonymous", "--github-url", "--github-api-url",
    "--oauth-client-id", "--oauth-client-secret-file", "--session-key-file", "--session-max-age",
    "--public-url",
]  # fmt: skip


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default --data-dir is under $XDG_STATE_HOME: never the real one in tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        cwd=ROOT,
        env=environ() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@dataclass(frozen=True)
class Files:
    tmp: Path
    key: Path
    crt: Path
    pfx: Path

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)


@pytest.fixture(scope="module")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ssl")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make-dev-cert"), str(directory)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    return directory


@pytest.fixture
def files(tmp_path: Path, dev_cert: Path) -> Files:
    key, crt, pfx = (dev_cert / f"pulsar.local.{ext}" for ext in ("key", "crt", "pfx"))
    return Files(tmp_path, key, crt, pfx)


def test_help_lists_every_flag_and_its_environment_variable() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("usage: pulsar-rest")
    listed = set(re.findall(r"^  (--[a-z-]+)", done.stdout, re.MULTILINE)) - {"--help", "--version"}
    assert listed >= set(FLAGS)
    for flag in listed:  # every flag, also those added after this test
        assert "PULSAR_REST_" + flag[2:].replace("-", "_").upper() in done.stdout, flag


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert re.fullmatch(r"pulsar-rest \S+\n", done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pulsar-rest: "), lines[0]
    for part in expected:
        assert part in lines[0]
    return lines[0]


# Each case: the arguments (given the files at hand), then what the error line must contain.
ERRORS: dict[str, Callable[[Files], tuple[list[str], list[str]]]] = {
    "unknown-flag": lambda f: (["--nope"], ["unrecognized arguments: --nope"]),
    "port-not-a-number": lambda f: (["--port", "abc"], ["--port: 'abc' must be a whole number"]),
    "port-out-of-range": lambda f: (["--port", "65536"], ["--port", "between 0 and 65535"]),
    "tls-1.1": lambda f: (["--ssl-min-version", "1.1"], ["--ssl-min-version: '1.1' must be one of 1.2, 1.3"]),
    "config-branch": lambda f: (
        ["--config-repo", str(f.tmp), "--config-branch", "develop"],
        ["is a directory, not a git repository", "--config-branch develop cannot apply"],
    ),
    "config-repo": lambda f: (
        ["--config-repo", str(f.tmp / "no-such-repo.git")],
        ["configuration repository"],
    ),
    "auth-username": lambda f: (
        ["--auth-username", "x"],
        ["--auth-username and --auth-password", "together"],
    ),
    "open-without-auth": lambda f: (
        ["--host", "0.0.0.0"],
        ["--host 0.0.0.0: without authentication", "--allow-anonymous"],
    ),
    "bad-grant": lambda f: (["--auth-write", "team:acme"], ["--auth-write: 'team:acme' is not a team grant"]),
    "unknown-grant-kind": lambda f: (
        ["--auth-read", "group:x"],
        ["--auth-read: 'group:x': the kind must be"],
    ),
    "sign-in-without-grants": lambda f: (
        ["--oauth-client-id", "x", "--oauth-client-secret-file", f.write("secret", "s3\n")],
        ["--oauth-client-id: browser sign-in needs --auth-read or --auth-write"],
    ),
    "token-provider-with-grants": lambda f: (
        ["--auth-provider", "token", "--auth-write", "alice"],
        ["--auth-provider token takes none"],
    ),
    "password-file-missing": lambda f: (
        ["--auth-username", "x", "--auth-password-file", str(f.tmp / "none")],
        [f"cannot read --auth-password-file {f.tmp / 'none'}"],
    ),
    "key-without-cert": lambda f: (["--ssl-key", str(f.key)], ["--ssl-key and --ssl-cert go together"]),
    "unreadable-cert": lambda f: (
        ["--ssl-key", str(f.key), "--ssl-cert", str(f.tmp / "none.crt")],
        [f"cannot read --ssl-cert {f.tmp / 'none.crt'}"],
    ),
    "wrong-pfx-passphrase": lambda f: (
        ["--ssl-pfx", str(f.pfx), "--ssl-passphrase", f.write("pass", "wrong\n")],
        [f"--ssl-pfx {f.pfx}: cannot open it", "passphrase"],
    ),
    "config-not-yaml": lambda f: (
        ["--config", f.write("bad.yaml", "port: [8001\n")],
        [f"--config {f.tmp / 'bad.yaml'} is not valid YAML"],
    ),
    "config-unknown-key": lambda f: (
        ["--config", f.write("typo.yaml", "prot: 8001\n")],
        ["unknown setting 'prot'"],
    ),
    "config-missing": lambda f: (
        ["--config", str(f.tmp / "none.yaml")],
        [f"cannot read --config {f.tmp / 'none.yaml'}"],
    ),
    "log-dir-is-a-file": lambda f: (["--log-dir", f.write("file", "")], ["--log-dir"]),
    "data-dir-is-a-file": lambda f: (["--port", "0", "--data-dir", f.write("file", "")], ["--data-dir"]),
    "database-not-postgresql": lambda f: (["--database", "mysql://pw@db/x"], ["--database: *** must be"]),
    # Nothing listens on port 1: the password never shows in the error.
    "database-unreachable": lambda f: (
        ["--port", "0", "--database", "postgresql://u:s3cret@127.0.0.1:1/db"],
        ["--database postgresql://u:***@127.0.0.1:1/db: connection failed"],
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_start_up_error_is_one_line(files: Files, case: str) -> None:
    args, expected = ERRORS[case](files)
    assert_one_line_error(run(*args), *expected)


def test_invalid_environment_variable_is_one_line() -> None:
    done = run(env=environ(PULSAR_REST_KILL_GRACE="soon"))
    assert_one_line_error(done, "PULSAR_REST_KILL_GRACE: 'soon' must be a number of seconds")


def test_port_in_use_is_one_line(busy_port: int, pulsar_bin: str) -> None:
    done = run("--port", str(busy_port), "--pulsar-bin", pulsar_bin)
    assert_one_line_error(done, f"cannot listen on 127.0.0.1:{busy_port}")


# --- a real start ---


def test_serves_a_task_then_stops_on_sigterm(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "pulsar-rest.log"
    assert not log.parent.exists() and not (tmp_path / "data").exists()
    proc = start()
    port = listening_port(log, proc)
    assert port > 0
    assert (tmp_path / "data").is_dir()
    base = f"http://127.0.0.1:{port}"

    created = call(f"{base}/shop/production", {"action": "ok"})
    task = ended(base, created["taskId"])
    assert task["status"] == "finished"
    assert task["exitCode"] == 0
    assert task["output"].endswith("Executed task ok for shop on production!\n")

    stop(proc)
    assert log.read_text().rstrip().endswith("stopped")


def test_the_table_of_descriptors_is_grown_once_at_the_start(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Grown later, with threads, it waits for an RCU grace period (10-20 ms here): the
    create that crossed 512 descriptors was the slowest of 200."""
    proc = start()
    listening_port(tmp_path / "logs" / "pulsar-rest.log", proc)
    soft, _ = psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    size = re.search(r"^FDSize:\s+(\d+)$", status, re.MULTILINE)
    assert size is not None, status
    assert int(size.group(1)) >= min(soft, runner.RESERVED_DESCRIPTORS)
    stop(proc)


def test_sigterm_at_once_after_listening(start: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    """A supervisor may signal as soon as it reads the listening line: a clean stop still."""
    proc = start()
    listening_port(tmp_path / "logs" / "pulsar-rest.log", proc)
    stop(proc)


def test_a_second_sigterm_ends_the_grace(start: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    log = tmp_path / "logs" / "pulsar-rest.log"
    proc = start("--kill-grace", "1", "--shutdown-grace", "3600")
    base = f"http://127.0.0.1:{listening_port(log, proc)}"
    task = call(f"{base}/shop/production", {"action": "hang"})["task"]
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "running tasks get 3600s to end" in log.read_text(), proc, "the graceful stop")
    assert alive(task["pid"])  # given its hour
    stop(proc)  # a second SIGTERM: within TIMEOUT, not an hour
    assert not alive(task["pid"])
    assert "stopping now: running tasks are killed" in log.read_text()
    assert re.search(rf"task {task['id']} killed", log.read_text())


def test_sigterm_kills_running_tasks(start: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    proc = start("--kill-grace", "1", "--shutdown-grace", "0")
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs' / 'pulsar-rest.log', proc)}"
    task = call(f"{base}/shop/production", {"action": "hang"})["task"]
    pid = task["pid"]
    assert alive(pid)
    # The task's process is the server's child, so not this test's: check it by its pid.
    assert psutil.Process(pid).ppid() == proc.pid
    stop(proc)
    assert not alive(pid)
    # Stopped by the service on the way out, not merely orphaned or killed with the server.
    log = (tmp_path / "logs" / "pulsar-rest.log").read_text()
    assert re.search(
        rf"stopping.*\n.*task {task['id']}: kill requested by shutdown\n.*task {task['id']} killed", log
    )


def test_https_with_the_dev_certificate(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path, files: Files
) -> None:
    proc = start("--ssl-key", str(files.key), "--ssl-cert", str(files.crt))
    port = listening_port(tmp_path / "logs" / "pulsar-rest.log", proc, scheme="https")
    ctx = ssl.create_default_context(cafile=str(files.crt))  # verifies the name localhost
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    with opener.open(f"https://localhost:{port}/tasks", timeout=TIMEOUT) as resp:
        assert resp.status == 200
        assert json.load(resp)["url"] == f"https://localhost:{port}/"
    stop(proc)


def test_the_access_log_never_shows_a_code_or_a_token(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    server = start("--access-log", "--shutdown-grace", "0")
    log = tmp_path / "logs" / "pulsar-rest.log"
    base = f"http://127.0.0.1:{listening_port(log, server)}"
    call(f"{base}/status?code=c0de-s3cret&state=st4te-s3cret&access_token=t0ken-s3cret&page=2")
    wait_for(lambda: "GET /status?" in log.read_text(), server, "the access log line")
    text = log.read_text()
    assert "s3cret" not in text
    assert "/status?code=***&state=***&access_token=***&page=2" in text
    stop(server)


def test_sighup_reopens_the_log_that_logrotate_moved(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    server = start("--shutdown-grace", "0")
    log = tmp_path / "logs" / "pulsar-rest.log"
    base = f"http://127.0.0.1:{listening_port(log, server)}"
    rotated = log.rename(log.with_name("pulsar-rest.log.1"))  # what logrotate does first
    server.send_signal(signal.SIGHUP)  # its postrotate
    wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), server, "the new log file")
    task = call(f"{base}/shop/production", {"action": "ok"})["task"]
    wait_for(lambda: f"task {task['id']} running" in log.read_text(), server, "the task's line")
    assert f"task {task['id']} running" not in rotated.read_text()
    assert "listening on" in rotated.read_text()
    stop(server)


def test_json_log_lines(start: Callable[..., subprocess.Popen[str]], tmp_path: Path) -> None:
    server = start("--log-format", "json", "--shutdown-grace", "0")
    log = tmp_path / "logs" / "pulsar-rest.log"

    def entries() -> list[dict[str, Any]]:
        text = log.read_text() if log.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    wait_for(lambda: any("listening on" in e["message"] for e in entries()), server, "the listening line")
    listening = next(e for e in entries() if "listening on" in e["message"])
    assert set(listening) == {"time", "level", "logger", "message"} and listening["level"] == "INFO"
    port = int(listening["message"].rsplit(":", 1)[1].rstrip("/"))
    task = call(f"http://127.0.0.1:{port}/shop/production", {"action": "ok"})["task"]
    wait_for(lambda: any(e.get("taskId") == task["id"] for e in entries()), server, "a line of the task")
    assert all(isinstance(e["time"], str) and e["time"].endswith("+00:00") for e in entries())
    stop(server)


def test_the_lines_of_one_turn_of_the_loop_reach_the_log_s_thread_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One wake-up of the writing thread a turn of the event loop, not one a line, the lines
    in order; a line from another thread, and a warning, go at once; the lines of a turn
    that a stopped loop never ended go with the next line of another loop, or at stop()."""
    handed: list[int] = []

    class Counted(queue.SimpleQueue[logfile._Lines | None]):
        def put_nowait(self, item: logfile._Lines | None) -> None:
            if item is not None:  # (None: the listener's stop)
                handed.append(len(item) if isinstance(item, list) else 1)
            super().put_nowait(item)

    monkeypatch.setattr(queue, "SimpleQueue", Counted)  # the one configure() makes
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log = logging.getLogger("pulsar_rest.test")

    async def turns() -> None:
        for line in range(3):
            log.info("line %d", line)
        await asyncio.sleep(0)  # the turn ends: its lines go
        await asyncio.to_thread(log.info, "from a thread")
        log.info("before the warning")
        log.warning("warned")

    def cut_off(loop: asyncio.AbstractEventLoop, line: str) -> None:
        """Log `line` in the last turn of `loop`: it stops before that turn ends."""
        loop.call_soon(loop.stop)
        loop.call_soon(log.info, line)
        loop.run_forever()

    writer = logfile.configure(tmp_path, "text", debug=False)
    try:
        first = asyncio.new_event_loop()
        try:
            first.run_until_complete(turns())
            cut_off(first, "cut off")
        finally:
            first.close()
        second = asyncio.new_event_loop()
        try:
            second.call_soon(log.info, "next loop")
            cut_off(second, "at the stop")
        finally:
            second.close()
    finally:
        logfile.stop()
        writer.close()
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [line.rsplit(": ", 1)[1] for line in (tmp_path / logfile.LOG_NAME).read_text().splitlines()]
    assert lines == [
        *("line 0", "line 1", "line 2", "from a thread", "before the warning", "warned"),
        *("cut off", "next loop", "at the stop"),
    ]
    assert handed == [3, 1, 1, 1, 1, 2]


def test_the_log_s_thread_writes_what_piled_up_at_once() -> None:
    """The lines queued while the writing thread wrote go in one write of the stream, up to
    the stop; what follows the stop is not its to write. The lines come made: the thread
    formats nothing."""
    lines: queue.SimpleQueue[logfile._Lines | None] = queue.SimpleQueue()
    writes: list[str] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    listener = logfile._Listener(lines, logging.StreamHandler(Stream()))
    for queued in (["a", "b"], "c", ["d"], None, ["e"]):
        lines.put_nowait(queued)
    taken = listener.dequeue(True)
    assert taken == ["a", "b", "c", "d"]
    listener.handle(taken)
    assert writes == ["a\nb\nc\nd\n"]
    assert listener.dequeue(True) is None  # the stop, after what came before it
    assert lines.get_nowait() == ["e"]


def test_the_logrotate_example_rotates_a_running_server(
    start: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """config/logrotate, pointed at this test's log and with its postrotate signalling this
    server rather than systemd's unit, run by Debian's logrotate."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert Path(logrotate).exists(), "logrotate is missing: apt-get install logrotate (.ci/run does)"
    server = start("--shutdown-grace", "0")
    log = tmp_path / "logs" / "pulsar-rest.log"
    base = f"http://127.0.0.1:{listening_port(log, server)}"
    example = (ROOT / "config" / "logrotate").read_text()
    assert "/var/log/pulsar-rest/pulsar-rest.log {" in example and "systemctl kill" in example
    config = example.replace("/var/log/pulsar-rest/pulsar-rest.log", str(log))
    config = re.sub(r"systemctl kill .*\n", f"kill -HUP {server.pid}\n", config)
    config = re.sub(r"\n\s*create .*\n", "\n", config)  # no pulsar-rest user here
    (tmp_path / "logrotate.conf").write_text(config)
    subprocess.run(
        [logrotate, "--force", "--state", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")],
        check=True,
        timeout=TIMEOUT,
    )
    rotated = log.with_name("pulsar-rest.log.1")  # delaycompress: the newest is not compressed yet
    assert "listening on" in rotated.read_text()
    wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), server, "the new log file")
    task = call(f"{base}/shop/production", {"action": "ok"})["task"]
    wait_for(lambda: f"task {task['id']} running" in log.read_text(), server, "the task's line")
    assert f"task {task['id']} running" not in rotated.read_text()
    stop(server)


def test_a_reader_of_stdout_that_lags_never_stops_the_server(tmp_path: Path, pulsar_bin: str) -> None:
    """The log is written from a thread of its own: with stdout a pipe nobody reads (a
    stuck log collector), the server goes on answering, and no line is lost."""
    argv = command("--port", "0", "--pulsar-bin", pulsar_bin, "--data-dir", str(tmp_path / "data"))
    server = subprocess.Popen(
        [*argv, "--access-log"], cwd=ROOT, env=environ(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        while not (found := re.search(r"listening on (http://127\.0\.0\.1:\d+)/", server.stdout.readline())):
            assert server.poll() is None, "the server stopped"
        base = found.group(1)
        count = 1000  # an access line each: about 120 KiB, twice what a pipe holds
        for _ in range(count):
            assert call(f"{base}/health")["ok"] is True
        server.send_signal(signal.SIGTERM)
        rest, _ = server.communicate(timeout=TIMEOUT)
        assert rest.count('"GET /health HTTP/1.1" 200') == count
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
