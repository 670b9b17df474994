"""One data directory, one server: a second start changes nothing and kills nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pulsar_rest.datadir import LOCK_NAME, DataDirError, DataDirLock
from tests.conftest import DEMO, alive
from tests.serving import ROOT, TIMEOUT, call, command, environ, listening_port, stop, wait_for

Start = Callable[..., subprocess.Popen[str]]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def one_line_exit_2(proc: subprocess.Popen[str], *expected: str) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, err
    assert out == "", out  # nothing on stdout, not even a log line
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pulsar-rest: "), err
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def read_output(base: str, task_id: int, until: str) -> str:
    """The task's output once it holds `until` (followed by offset, with a deadline)."""
    output = ""
    while until not in output:
        answer = call(f"{base}/task/{task_id}/output?offset={len(output.encode())}&timeout=5")
        assert answer["complete"] is False, answer
        output += answer["output"]
    return output


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "other-port"])
def test_a_second_server_on_the_same_data_directory_changes_nothing(
    start: Start, tmp_path: Path, gates: Path, same_port: bool
) -> None:
    first = start("--kill-grace", "1", "--shutdown-grace", "0")
    port = listening_port(tmp_path / "logs" / "pulsar-rest.log", first)
    base = f"http://127.0.0.1:{port}"
    # A tree that ignores SIGTERM: the old recovery would have taken it with SIGKILL.
    task = call(f"{base}/shop/production", {"action": "grandchild[gc.pid]"})["task"]
    grandchild = int(read_output(base, task["id"], "grandchild ").split()[1])
    data = tmp_path / "data"
    before = snapshot(data)
    assert f"logs/{task['id']}.log" in before and "pulsar-rest.db" in before

    second = start("--port", str(port if same_port else 0), "--log-dir", str(tmp_path / "logs-2"))
    line = one_line_exit_2(second, f"--data-dir {data} is in use", f"pid {first.pid}", f"{base}/")

    assert "Traceback" not in line
    assert snapshot(data) == before
    assert not (tmp_path / "logs-2").exists()  # it logged nothing anywhere
    assert alive(task["pid"]) and alive(grandchild)
    assert call(f"{base}/task/{task['id']}")["status"] == "running"
    stop(first)
    assert not alive(task["pid"]) and not alive(grandchild)


def test_port_in_use_is_found_before_the_recovery_runs(start: Start, tmp_path: Path, busy_port: int) -> None:
    # A server killed with -9 leaves a task running and recorded as running: the next start
    # on a port that is taken must neither record it as interrupted nor stop its process.
    crashed = start()
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs' / 'pulsar-rest.log', crashed)}"
    task = call(f"{base}/shop/production", {"action": "hang"})["task"]
    read_output(base, task["id"], "hanging")
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait(TIMEOUT)
    # The lock file is its holder's to write: the crashed server's, then the blocked one's.
    before = snapshot(tmp_path / "data")
    del before[LOCK_NAME]

    blocked = start("--port", str(busy_port), "--log-dir", str(tmp_path / "logs-2"))
    one_line_exit_2(blocked, f"cannot listen on 127.0.0.1:{busy_port}")
    after = snapshot(tmp_path / "data")
    del after[LOCK_NAME]
    assert after == before
    assert alive(task["pid"])

    # The lock died with the crashed server (no stale lock): the next start recovers.
    again = start("--log-dir", str(tmp_path / "logs-3"), "--shutdown-grace", "0")
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs-3' / 'pulsar-rest.log', again)}"
    assert call(f"{base}/task/{task['id']}")["status"] == "interrupted"
    wait_for(lambda: not alive(task["pid"]), again, "the leftover task to be stopped")
    stop(again)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), capture_output=True, text=True, env=environ(), cwd=ROOT, timeout=TIMEOUT
    )


def test_a_failed_start_leaves_nothing_behind(tmp_path: Path) -> None:
    new = tmp_path / "new"
    done = run("--port", "0", "--data-dir", str(new), "--config-repo", str(tmp_path / "nonexistent" / "repo"))
    assert done.returncode == 2 and "configuration repository" in done.stderr
    assert not new.exists()

    # A data directory that was there keeps what it had, and only that (and its lock file).
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    done = run("--port", "0", "--data-dir", str(kept), "--config-repo", str(tmp_path / "nonexistent"))
    assert done.returncode == 2
    assert sorted(os.listdir(kept)) == ["notes.txt", LOCK_NAME]


def test_the_lock_says_who_holds_it(tmp_path: Path) -> None:
    lock = DataDirLock.claim(tmp_path / "data")
    try:
        with pytest.raises(
            DataDirError, match=rf"is in use by another pulsar-rest \(pid {os.getpid()}, starting\)"
        ):
            DataDirLock.claim(tmp_path / "data")
        lock.announce(["http://127.0.0.1:8001/", "http://[::1]:8001/"])
        with pytest.raises(
            DataDirError, match=r"listening on http://127\.0\.0\.1:8001/, http://\[::1\]:8001/"
        ):
            DataDirLock.claim(tmp_path / "data")
    finally:
        lock.release()
    DataDirLock.claim(tmp_path / "data").release()  # free again once released


def test_start_script_help_and_version_print_only_that() -> None:
    for flag, expected in (("--version", "pulsar-rest "), ("--help", "usage: pulsar-rest")):
        done = subprocess.run(
            [str(ROOT / "scripts" / "start"), flag],
            capture_output=True,
            text=True,
            env=environ(),
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected)
        assert "demo" not in done.stderr and "pulsar" not in done.stderr  # (a first run sets up .venv)


async def test_the_log_says_a_plain_directory_is_no_git(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp.test_utils import TestServer

    from pulsar_rest.settings import Settings
    from pulsar_rest.web.app import create_app

    caplog.set_level("INFO")
    async with TestServer(create_app(Settings(config_repo=str(DEMO), data_dir=tmp_path / "data"))):
        pass
    assert f"configuration repository {DEMO}: a plain directory (no git)" in caplog.text
