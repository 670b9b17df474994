"""GET /openapi.json: the document is valid OpenAPI 3.1, documents exactly the routes the app
serves (HEAD included, where aiohttp answers it) with their access rules, and a live server
answers as it says: schemathesis sends generated requests from it, once with authentication
off and once with `--auth-provider token` and a write token.

What schemathesis leaves out: `GET /events` and `GET /task/{id}/stream`, streams that do not
end while a task runs (test_streams_answer_as_documented looks at their heads). `GET /apps`
and `GET /tasks/available` too in the run without a configuration repository, where their
503 is by design (and `not_a_server_error` refuses every 5xx); the run with authentication
has one.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.core.result import Ok

from pulsar_rest.auth.grants import Role
from pulsar_rest.store import TokenAdmin
from pulsar_rest.web.auth import Access
from pulsar_rest.web.openapi import DOCUMENT, NO_HEAD
from pulsar_rest.web.routes import ROUTES
from tests.conftest import DEMO, Client, ClientFactory, create, finished, follow, get_json
from tests.serving import OPENER, TIMEOUT, listening_port, stop

Start = Callable[..., subprocess.Popen[str]]

METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
# The checks of a response against the document, and that it is no 5xx.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
STREAMS = ("/events", "/task/{id}/stream")
MIN_REQUESTS = 1000  # in each run
RUN_TIMEOUT = 45.0  # seconds for one schemathesis run at most (15 to 25 here)


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def test_document_is_valid_openapi_3_1() -> None:
    """Against the OpenAPI 3.1 schema (schemathesis's loader), every operation resolvable."""
    schema = schemathesis.openapi.from_dict({**DOCUMENT, "servers": [{"url": "/"}]})
    schema.validate()
    results = list(schema.get_all_operations())
    failed = [result for result in results if not isinstance(result, Ok)]
    assert not failed, failed
    assert len(results) == len(_documented(DOCUMENT))
    ids = [op["operationId"] for item in DOCUMENT["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids))


async def test_document_matches_the_router(client: Client) -> None:
    """Every route the app serves is documented, and nothing else: HEAD where aiohttp serves
    it (every GET but the streams and GET /task/{id}/kill, see NO_HEAD)."""
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    document = await resp.json()
    assert document["servers"] == [{"url": "/"}]
    assert client.app is not None
    routed = {
        (route.method, resource.canonical) for resource in client.app.router.resources() for route in resource
    }
    documented = _documented(document)
    assert routed - documented == set(), "served, not documented"
    assert documented - routed == set(), "documented, not served"
    heads = {path for method, path in routed if method == "HEAD"}
    gets = {path for method, path in routed if method == "GET"}
    assert gets - heads == NO_HEAD


async def test_access_rules_are_documented(client: Client) -> None:
    """Each operation's x-access and security say what the route's rule in ROUTES does."""
    for route in ROUTES:
        # A path parameter's pattern ({path:.+}) is the router's, not the document's.
        item = DOCUMENT["paths"][re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)]
        for method in (
            ["get", "head"] if route.method == "GET" and route.path not in NO_HEAD else [route.method.lower()]
        ):
            operation = item[method]
            assert operation["x-access"] == route.rule.access.value, (method, route.path)
            open_ = route.rule.access is Access.OPEN
            assert ({} in operation["security"]) == open_, (method, route.path)
            codes = set(operation["responses"])
            assert "default" in codes and "400" in codes
            if not open_:
                assert {"401", "403", "503"} <= codes, (method, route.path)


async def test_served_open_with_the_public_url(make_client: ClientFactory) -> None:
    client = await make_client(auth_provider="token", public_url="https://deploy.example.com/pulsar")
    resp = await client.get("/openapi.json")  # no credentials: open
    assert resp.status == 200
    document = await resp.json()
    assert document["servers"] == [{"url": "https://deploy.example.com/pulsar"}]
    assert document["paths"] == json.loads(json.dumps(DOCUMENT["paths"]))
    assert (await client.head("/openapi.json")).status == 200
    resp = await client.get("/tasks")
    assert resp.status == 401
    _conforms("Error", await resp.json())


async def test_the_page_links_to_it(client: Client) -> None:
    resp = await client.get("/")
    assert 'href="openapi.json"' in await resp.text()


async def test_streams_answer_as_documented(client: Client) -> None:
    """The streams schemathesis leaves out: a documented status and media type."""
    task = await create(client, "ok")
    await finished(client, task["id"])
    resp = await client.get(f"/task/{task['id']}/stream")  # ends with the (ended) task
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert "event: end" in await resp.text()
    async with client.get("/events") as resp:  # endless: its head only
        assert resp.status == 200 and resp.content_type == "text/event-stream"
    for path, status in [
        ("/task/99/stream", 404),
        ("/events?since=x", 400),
        (f"/task/{task['id']}/stream?offset=99999", 410),
    ]:
        resp = await client.get(path)
        assert resp.status == status
        item = DOCUMENT["paths"]["/events" if path.startswith("/events") else "/task/{id}/stream"]["get"]
        assert str(status) in item["responses"]


def _conforms(name: str, body: Any) -> None:
    """`body` is valid against the document's schema `name` (formats included)."""
    schema = {"components": DOCUMENT["components"], "$ref": f"#/components/schemas/{name}"}
    errors = [
        error.message
        for error in jsonschema_rs.validator_for(schema, validate_formats=True).iter_errors(body)
    ]
    assert errors == [], (name, body)


async def test_a_running_task_answers_as_documented(client: Client, gates: Path) -> None:
    """What the generated requests seldom meet: a running task, its process tree (with the
    environments, for the write role) and its kill."""
    seq = (await get_json(client, "/status"))["seq"]
    task = await create(client, "gate[never]")
    task_id = task["id"]
    await follow(client, task_id, lambda t: t["outputSize"] > 0)  # it waits for its gate
    processes = await get_json(client, f"/task/{task_id}/processes")
    _conforms("Processes", processes)
    assert processes["processes"] and "environ" in processes["processes"][0]
    for path, name in [
        (f"/task/{task_id}", "Task"),
        ("/tasks?output=false", "TaskList"),
        ("/tasks", "TaskList"),
        ("/status", "Status"),
        ("/me", "Me"),
        ("/health", "Health"),
        ("/host", "Host"),
        (f"/task/{task_id}/output?offset=0", "OutputFrom"),
        (f"/tasks/created?since={seq}", "CreatedSince"),
        (f"/task/{task_id}/state?since={seq}", "StateSince"),
    ]:
        resp = await client.get(path)
        assert resp.status == 200, path
        _conforms(name, await resp.json())
    resp = await client.post("/app/prod", json={"action": "ok"})
    assert resp.status == 409
    _conforms("Error", error := await resp.json())
    assert error["error"]["taskId"] == task_id
    resp = await client.post(f"/task/{task_id}/kill")
    assert resp.status == 200
    _conforms("Task", killed := await resp.json())
    assert killed["status"] == "killed"


# --- schemathesis against a live server ---------------------------------------------------


def _serve(start: Start, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    # Long-polls and waited creations answer within 0.2 s; stopping kills what still runs.
    proc = start("--long-poll-timeout", "0.2", "--kill-grace", "0.2", "--shutdown-grace", "1", *args)
    return proc, f"http://127.0.0.1:{listening_port(tmp_path / 'logs' / 'pulsar-rest.log', proc)}"


def _tasks(base: str, app: str, headers: dict[str, str]) -> None:
    """Tasks for the generated requests to find (they try the smallest ids most): one that
    runs until it is killed or the server stops, an ended one with its stdout kept apart,
    and a failed one."""
    for env, body in [
        ("one", {"action": "hang"}),
        ("two", {"action": "ok", "stdout": True, "wait": True}),
        ("three", {"action": "fail", "wait": True}),
    ]:
        request = urllib.request.Request(
            f"{base}/{app}/{env}", json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        )
        with OPENER.open(request, timeout=TIMEOUT) as resp:
            assert resp.status in (200, 202), resp.read()  # 202: not ended within the wait


def _schemathesis(base: str, tmp_path: Path, *args: str) -> list[tuple[str, str, int]]:
    """Run schemathesis from the served document; (method, path, status) of every request."""
    report = tmp_path / "schemathesis.ndjson"
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
        "--checks", CHECKS,
        *[arg for path in STREAMS for arg in ("--exclude-path", path)],
        "--generation-deterministic",  # the same requests each run (no seed, no database)
        "--max-examples", "10",
        "--workers", "1",  # two: CPython 3.11's ast fails in threads at once (python/cpython#106905)
        "--request-timeout", "10",
        "--report", "ndjson", "--report-ndjson-path", str(report),
        "--no-color",
        *args,
    ]  # fmt: skip
    # Straight to 127.0.0.1, whatever proxy the environment names.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = (tmp_path / "logs" / "pulsar-rest.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR pulsar_rest" in line]
    assert done.returncode == 0, f"{done.stdout[-20000:]}\n{done.stderr[-5000:]}\nserver errors: {errors}"
    assert not errors, errors
    return _requests(report)


def _requests(report: Path) -> list[tuple[str, str, int]]:
    found = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" not in event:
            continue
        recorder = event["ScenarioFinished"]["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            response = interaction["response"]
            assert response is not None, interaction  # no request without an answer
            found.append((case["method"], case["path"], response["status_code"]))
    return found


def _explicit(requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The answers whose status the document does not name for its operation (the checks
    accept them under `default`, which is the envelope): 405 for a method the path lacks."""
    wrong = []
    for method, path, status in requests:
        operation = DOCUMENT["paths"][path].get(method.lower())
        named = {"405"} if operation is None else set(operation["responses"])
        if str(status) not in named:
            wrong.append((method, path, status))
    return wrong


def _summary(mode: str, requests: list[tuple[str, str, int]]) -> None:
    statuses = collections.Counter(status for _, _, status in requests)
    print(f"schemathesis, {mode}: {len(requests)} requests, by status {dict(sorted(statuses.items()))}")


def test_schemathesis_without_authentication(start: Start, tmp_path: Path) -> None:
    proc, base = _serve(start, tmp_path)
    try:
        _tasks(base, "app", {})
        requests = _schemathesis(
            base, tmp_path, "--exclude-path", "/apps", "--exclude-path", "/tasks/available"
        )
    finally:
        stop(proc)
    _summary("authentication off", requests)
    assert len(requests) >= MIN_REQUESTS
    assert _explicit(requests) == []
    created = [r for r in requests if r[:2] == ("POST", "/{app}/{env}") and r[2] in (200, 202)]
    assert created, "no task was created"


def test_schemathesis_with_a_write_token(start: Start, tmp_path: Path) -> None:
    admin = TokenAdmin(tmp_path / "data")
    try:
        token = admin.create("ci", Role.WRITE, None)
    finally:
        admin.close()
    # The demo configuration repository: GET /apps answers, and its environments can deploy.
    conf = tmp_path / "conf"
    shutil.copytree(DEMO, conf)
    for env in ("one", "two", "three"):
        (conf / "apps" / "example" / f"{env}.rb").write_text("")
    proc, base = _serve(start, tmp_path, "--auth-provider", "token", "--config-repo", str(conf))
    auth = f"Authorization: Bearer {token}"
    try:
        _tasks(base, "example", {"Authorization": f"Bearer {token}"})
        requests = _schemathesis(base, tmp_path, "--header", auth)
    finally:
        stop(proc)
    _summary("a write token", requests)
    assert len(requests) >= MIN_REQUESTS
    assert _explicit(requests) == []
    statuses = collections.Counter(status for _, _, status in requests)
    assert statuses[200] > statuses[401], "the token was not used"
