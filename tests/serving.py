"""The `pulsar-rest` command as a real process, for the tests that need one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
TIMEOUT = 30.0  # for any one wait on the process: generous, never reached when all is well


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pulsar_rest", *args]


def environ(**extra: str) -> dict[str, str]:
    """This environment without PULSAR_REST_* settings of its own, and a fixed help width."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULSAR_REST_")}
    return {**env, "COLUMNS": "80", **extra}


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    """Poll `predicate` until it holds; fail at the deadline or if the process has ended."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=TIMEOUT)
            raise AssertionError(f"pulsar-rest exited ({proc.returncode}) waiting for {what}: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def listening_port(log: Path, proc: subprocess.Popen[str], scheme: str = "http") -> int:
    pattern = re.compile(rf"listening on {scheme}://127\.0\.0\.1:(\d+)/$", re.MULTILINE)
    found: list[int] = []

    def listening() -> bool:
        match = pattern.search(log.read_text()) if log.exists() else None
        if match:
            found.append(int(match.group(1)))
        return match is not None

    wait_for(listening, proc, f"the listening line in {log}")
    return found[0]


# No proxy from the environment: the requests go to 127.0.0.1 directly.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(
    url: str, body: dict[str, Any] | None = None, opener: urllib.request.OpenerDirector = OPENER
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=TIMEOUT) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = json.load(resp)
    return answer


def ended(base: str, task_id: int) -> dict[str, Any]:
    """Long-poll /task/:id/state until the task has ended, with a deadline."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        answer = call(f"{base}/task/{task_id}/state?timeout=5")
        if answer["changed"]:
            task: dict[str, Any] = answer["task"]
            return task
    raise AssertionError(f"task {task_id} has not ended")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
