"""Several instances on one PostgreSQL, as real processes: a task made through one is seen,
followed with the same cursors, and killed through another; a restart keeps the cursors."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.serving import call, ended, listening_port

Start = Callable[..., subprocess.Popen[str]]


def instance(
    start: Start, tmp_path: Path, name: str, dsn: str, run: int = 1
) -> tuple[subprocess.Popen[str], str]:
    """A server of its own data directory (a log for each run) on the shared database; its
    base URL."""
    logs = tmp_path / name / f"logs-{run}"
    proc = start("--database", dsn, "--data-dir", str(tmp_path / name / "data"), "--log-dir", str(logs))
    return proc, f"http://127.0.0.1:{listening_port(logs / 'pulsar-rest.log', proc)}"


def test_a_task_of_one_instance_is_followed_and_killed_through_another(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    _, a = instance(start, tmp_path, "a", postgres_dsn)
    b_proc, b = instance(start, tmp_path, "b", postgres_dsn)
    since = call(f"{b}/status")["seq"]
    assert call(f"{a}/status")["seq"] == since  # one sequence for all

    task = call(f"{a}/shop/prod", {"action": "hang"})["task"]
    created = call(f"{b}/tasks/created?since={since}&timeout=10")
    assert [t["id"] for t in created["tasks"]] == [task["id"]] and created["changed"]
    running = call(f"{b}/task/{task['id']}/state?since={created['next']}&timeout=10")
    assert running["changed"] and running["task"]["status"] == "running"

    # Killed through B: A, which runs it, stops it, and B answers once it has ended.
    killed: dict[str, Any] = call(f"{b}/task/{task['id']}/kill", {})
    assert (killed["status"], killed["killedBy"]) == ("killed", "127.0.0.1")
    assert ended(a, task["id"])["status"] == "killed"
    listed = call(f"{b}/tasks?output=false")
    assert listed["ids"] == [task["id"]] and listed["tasks"][str(task["id"])]["status"] == "killed"
    events = call(f"{a}/tasks/created?since={since}&timeout=0")
    assert events["next"] == call(f"{b}/tasks/created?since={since}&timeout=0")["next"]

    # A restart of B keeps the cursors: what A does after is there from B's old cursor on.
    cursor = call(f"{b}/status")["seq"]
    b_proc.terminate()
    b_proc.communicate(timeout=30)
    b_proc, b = instance(start, tmp_path, "b", postgres_dsn, run=2)
    later = call(f"{a}/shop/stage", {"action": "ok"})["task"]
    assert [t["id"] for t in call(f"{b}/tasks/created?since={cursor}&timeout=10")["tasks"]] == [later["id"]]
    assert ended(b, later["id"])["status"] == "finished"
