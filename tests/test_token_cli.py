"""`pulsar-rest token create|list|revoke`, the real command, against a running server that
accepts only these tokens (--auth-provider token)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pulsar_rest.auth.tokens import ApiToken
from pulsar_rest.store import TokenAdmin
from tests.serving import OPENER, ROOT, TIMEOUT, command, environ, listening_port, wait_for

Start = Callable[..., subprocess.Popen[str]]
Done = subprocess.CompletedProcess[str]
DAY = 86400.0


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[str]
    base: str
    data: Path  # its data directory: where the command finds the tokens


@pytest.fixture
def server(start: Start, tmp_path: Path) -> Server:
    proc = start("--auth-provider", "token")
    port = listening_port(tmp_path / "logs" / "pulsar-rest.log", proc)
    return Server(proc, f"http://127.0.0.1:{port}", tmp_path / "data")


def token_cli(*argvs: list[str]) -> list[Done]:
    """Run `pulsar-rest token ARGV...` once for each argv, all at once (each start of Python
    costs a few tenths of a second); their results, in order."""
    procs = [
        subprocess.Popen(
            command("token", *argv),
            cwd=ROOT,
            env=environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    done = []
    for proc, argv in zip(procs, argvs, strict=True):
        out, err = proc.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def run(*argv: str) -> Done:
    [done] = token_cli(list(argv))
    return done


def create(data: Path, name: str, role: str, *more: str) -> str:
    """A new token, checked to be printed alone on stdout."""
    done = run("create", name, "--role", role, "--data-dir", str(data), *more)
    assert done.returncode == 0, done.stderr
    token = done.stdout.removesuffix("\n")
    assert done.stdout == token + "\n" and token.startswith("prt_") and "\n" not in token
    return token


def stored(data: Path) -> list[ApiToken]:
    """The tokens as the database holds them, read in this process (no Python to start)."""
    admin = TokenAdmin(data)
    try:
        return admin.tokens()
    finally:
        admin.close()


def call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """A request with `Authorization: Bearer token`: its status and JSON body, errors too."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with OPENER.open(request, timeout=TIMEOUT) as resp:
            answer: dict[str, Any] = json.load(resp)
            return resp.status, answer
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def assert_one_line_error(done: Done, code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.args, done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith("pulsar-rest token: ") and "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def test_create_use_and_list_a_token(server: Server) -> None:
    done = run("create", "deploy-bot", "--role", "write", "--data-dir", str(server.data))
    assert done.returncode == 0, done.stderr
    [token] = done.stdout.splitlines()
    assert done.stdout == token + "\n" and token.startswith("prt_") and len(token) > 40
    assert "shown this once" in done.stderr and token not in done.stderr

    # The running server takes it at once: no restart, no reload.
    status, answer = call("POST", f"{server.base}/shop/prod", token, {"action": "ok"})
    assert status == 200, answer
    assert answer["task"]["createdBy"] == "token:deploy-bot"

    # "last used" is written soon after the use, by the server.
    wait_for(lambda: stored(server.data)[0].last_used_at is not None, server.proc, "the use recorded")
    table, as_json = token_cli(
        ["list", "--data-dir", str(server.data)], ["list", "--json", "--data-dir", str(server.data)]
    )
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    [entry] = json.loads(as_json.stdout)
    assert set(entry) == {"name", "role", "createdAt", "expiresAt", "lastUsedAt"}
    assert (entry["name"], entry["role"], entry["expiresAt"]) == ("deploy-bot", "write", None)
    assert datetime.fromisoformat(entry["createdAt"]) <= datetime.fromisoformat(entry["lastUsedAt"])
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "ROLE", "CREATED", "EXPIRES", "LAST", "USED"]
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"
    assert re.fullmatch(rf"deploy-bot +write +{when} +never +{when}", row), row

    # Only the digest is kept: nowhere in the database files, the token itself.
    files = [path.read_bytes() for path in server.data.glob("pulsar-rest.db*")]
    assert files and not any(token.encode() in content for content in files)
    assert any(hashlib.sha256(token.encode()).hexdigest().encode() in content for content in files)
    assert token not in as_json.stdout + as_json.stderr + table.stdout + table.stderr


def test_a_revoked_token_is_refused_at_its_next_request(server: Server) -> None:
    token = create(server.data, "ci", "write")
    status, answer = call("GET", f"{server.base}/tasks", token)
    assert status == 200, answer
    revoked, unknown = token_cli(
        ["revoke", "ci", "--data-dir", str(server.data)],
        ["revoke", "nobody-made-this", "--data-dir", str(server.data)],
    )
    assert revoked.returncode == 0 and revoked.stdout == "" and "revoked" in revoked.stderr
    status, answer = call("GET", f"{server.base}/tasks", token)
    assert status == 401, answer
    assert answer["error"]["message"] == "unknown or revoked token"
    assert_one_line_error(unknown, 1, "no token named 'nobody-made-this'")


def test_a_read_token_reads_and_creates_nothing(server: Server) -> None:
    token = create(server.data, "dashboard", "read")
    status, answer = call("GET", f"{server.base}/tasks", token)
    assert status == 200, answer
    status, answer = call("POST", f"{server.base}/shop/prod", token, {"action": "ok"})
    assert status == 403, answer
    assert "token:dashboard has no write role" in answer["error"]["message"]
    status, answer = call("GET", f"{server.base}/tasks", token)
    assert (answer["total"], answer["tasks"]) == (0, {})  # the refused request made no task


def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    create(tmp_path / "data", "dup", "read")
    duplicate, bad_name, bad_role, negative, no_command = token_cli(
        ["create", "dup", "--role", "write", *data],
        ["create", "no spaces", "--role", "write", *data],
        ["create", "bot", "--role", "admin", *data],
        ["create", "bot", "--role", "write", "--expires", "-1", *data],
        [],
    )
    assert_one_line_error(duplicate, 2, "a token named 'dup' exists")
    assert_one_line_error(bad_name, 2, "invalid token name 'no spaces'")
    assert_one_line_error(bad_role, 2, "--role", "'admin'")
    assert_one_line_error(negative, 2, "--expires must be between")
    assert_one_line_error(no_command, 2, "required", "create|list|revoke")
    # None of them made or changed a token.
    [kept] = stored(tmp_path / "data")
    assert (kept.name, kept.role) == ("dup", "read")


def test_an_expired_token_is_refused(server: Server) -> None:
    lifetime = 0.00001 * DAY  # --expires is in days: this is 0.864 s
    began = time.time()
    token = create(server.data, "brief", "read", "--expires", "0.00001")
    status, answer = call("GET", f"{server.base}/tasks", token)
    if time.time() < began + lifetime:  # answered before it could have expired: it worked
        assert status == 200, answer
    refusals: list[dict[str, Any]] = []

    def refused() -> bool:
        status, answer = call("GET", f"{server.base}/tasks", token)
        refusals[:] = [answer]
        return status == 401

    wait_for(refused, server.proc, "the token to expire")
    assert refusals[0]["error"]["message"] == "the token brief has expired"
    [entry] = stored(server.data)
    assert entry.expires_at is not None
    assert abs((entry.expires_at - entry.created_at).total_seconds() - lifetime) < 0.01


def test_the_config_file_names_the_data_directory(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "pulsar-rest.yaml"
    config.write_text(f"data-dir: {json.dumps(str(server.data))}\nport: 9\n")
    done = run("create", "from-config", "--role", "write", "--config", str(config))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    status, answer = call("POST", f"{server.base}/shop/prod", token, {"action": "ok"})
    assert status == 200, answer
    assert answer["task"]["createdBy"] == "token:from-config"


def test_tokens_in_postgresql_and_its_password_never_shown(
    start: Start, tmp_path: Path, postgres_dsn: str
) -> None:
    # The test cluster trusts loopback: any password is accepted, and none may be shown.
    dsn = postgres_dsn.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@")
    proc = start("--auth-provider", "token", "--database", dsn)
    log_file = tmp_path / "logs" / "pulsar-rest.log"
    base = f"http://127.0.0.1:{listening_port(log_file, proc)}"
    done = run("create", "ci", "--role", "write", "--database", dsn)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    status, answer = call("POST", f"{base}/shop/prod", token, {"action": "ok"})
    assert (status, answer["task"]["createdBy"]) == (200, "token:ci")

    def used() -> bool:
        listed = run("list", "--json", "--database", dsn)
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)[0]["lastUsedAt"] is not None

    wait_for(used, proc, "the use recorded in PostgreSQL")
    assert run("revoke", "ci", "--database", dsn).returncode == 0
    assert call("GET", f"{base}/tasks", token)[0] == 401
    shown = log_file.read_text() + done.stderr
    assert "postgresql://postgres:***@127.0.0.1" in shown and "s3cret-pw" not in shown
    unreachable = run("list", "--database", "postgresql://postgres:s3cret-pw@127.0.0.1:1/none")
    assert_one_line_error(unreachable, 2, "--database postgresql://postgres:***@127.0.0.1:1/none")
    assert "s3cret-pw" not in unreachable.stderr
