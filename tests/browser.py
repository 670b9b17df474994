"""What the console's tests stand on: Debian's chromium driven by playwright, a real
pulsar-rest process with authentication through the local fake GitHub (served from a thread
of its own, since playwright's sync API wants no event loop in the test's thread), and a
configuration repository of a few apps for the fake pulsar to deploy."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from tests.fake_github import FakeGitHub
from tests.serving import OPENER, ROOT, TIMEOUT, command, environ, listening_port

T = TypeVar("T")

FAKE_PULSAR = Path(__file__).with_name("fake_pulsar.py")
ARTIFACTS = Path(__file__).with_name("artifacts")  # screenshots, one a test (gitignored)
ALICE_TOKEN, BOB_TOKEN = "console-alice-token", "console-bob-token"
# Apps of the test configuration repository: one per test that holds an environment, so
# that the tests of one server never find each other's deploys in the way.
APPS = ("web", "api", "big", "colours", "flood", "follow", "kill", "busy", "lines", "readonly", "hidden")


def chromium() -> str:
    """Debian's chromium, or a skip (a failure in CI: .ci/run installs it). Playwright never
    downloads a browser of its own here."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        message = "chromium is not installed (Debian: apt-get install chromium): the console tests need it"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true, so this is a failure")
        pytest.skip(message)
    return path


class ThreadedGitHub:
    """The fake GitHub on an event loop in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-github", daemon=True)
        self.thread.start()
        self.fake = self.run(self._start())

    async def _start(self) -> FakeGitHub:
        fake = FakeGitHub()
        await fake.start()
        return fake

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def close(self) -> None:
        self.run(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def conf_repo(path: Path) -> Path:
    """A plain-directory configuration repository with APPS, each with `prod` and `staging`,
    and a recipe that describes one task."""
    for app in APPS:
        (path / "apps" / app).mkdir(parents=True)
        for env in ("prod", "staging"):
            (path / "apps" / app / f"{env}.rb").write_text(f"# {app} on {env}\n")
    (path / "recipes").mkdir()
    (path / "recipes" / "ops.rake").write_text("namespace :ops do\n  desc 'Restart'\n  task :restart\nend\n")
    return path


def fake_pulsar(path: Path) -> str:
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_PULSAR}" "$@"\n')
    path.chmod(0o755)
    return str(path)


class Server:
    """A pulsar-rest process on a free port with the fake pulsar (and, with `github`,
    authentication: alice may write, members of org acme (bob) may read)."""

    running: ClassVar[set[int]] = set()  # the pids of those serving now

    def __init__(self, work: Path, github: FakeGitHub | None = None, conf: bool = True) -> None:
        self.work = work
        self.gates = work / "gates"
        self.gates.mkdir(parents=True)
        args = ["--port", "0", "--pulsar-bin", fake_pulsar(work / "pulsar"), "--kill-grace", "0.5"]
        args += ["--log-dir", str(work / "logs"), "--data-dir", str(work / "data")]
        if conf:
            args += ["--config-repo", str(conf_repo(work / "conf"))]
        if github is not None:
            secret = work / "client-secret"
            secret.write_text(github.client_secret + "\n")
            args += ["--auth-write", "alice", "--auth-read", "org:acme"]
            args += ["--github-url", github.url, "--github-api-url", github.api_url]
            args += ["--oauth-client-id", github.client_id, "--oauth-client-secret-file", str(secret)]
        self.proc = subprocess.Popen(
            command(*args),
            cwd=ROOT,
            env=environ(FAKE_PULSAR_DIR=str(self.gates)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        Server.running.add(self.proc.pid)
        port = listening_port(work / "logs" / "pulsar-rest.log", self.proc)
        self.url = f"http://127.0.0.1:{port}/"
        self.token: str | None = ALICE_TOKEN if github is not None else None

    def release(self, gate: str) -> None:
        (self.gates / gate).touch()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        """An API call as alice (by token), its JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with OPENER.open(request, timeout=TIMEOUT) as resp:
                status, answer = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read()
        assert status == expect, answer
        return json.loads(answer)

    def create(self, app: str, action: str, env: str = "prod", **body: Any) -> dict[str, Any]:
        task: dict[str, Any] = self.api("POST", f"{app}/{env}", {"action": action, **body})["task"]
        return task

    def ended(self, task_id: int) -> dict[str, Any]:
        for _ in range(int(TIMEOUT / 5)):
            answer = self.api("GET", f"task/{task_id}/state?timeout=5")
            if answer["changed"]:
                task: dict[str, Any] = answer["task"]
                return task
        raise AssertionError(f"task {task_id} has not ended")

    def stop(self) -> None:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=TIMEOUT)
        Server.running.discard(self.proc.pid)
        assert "Traceback" not in err, err
