"""Production: the systemd unit (config/pulsar-rest.service) as systemd reads it, the
readiness pulsar-rest tells systemd (sd_notify), and the nginx site (config/nginx.conf) run
by Debian's nginx on loopback in front of a running pulsar-rest, over TLS 1.3.

nginx and systemd-analyze must be installed (.ci/run installs them): without them these
tests fail, saying so, rather than skip."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pulsar_rest.settings import load_settings
from tests.conftest import eventually, release
from tests.nginx import (
    CERT,
    SITE,
    free_port,
    main_config,
    nginx_argv,
    nginx_running,
    site_on_loopback,
    tool,
)
from tests.serving import ROOT, TIMEOUT, call, ended, listening_port, stop, wait_for

UNIT = ROOT / "config" / "pulsar-rest.service"
EXAMPLE_CONFIG = ROOT / "config" / "pulsar-rest.example.yml"
# A deadline for what should come soon: a failure, never a pace.
DEADLINE = 10.0

Start = Callable[..., subprocess.Popen[str]]


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Garbage collected after each test: a connection a test left open warns (an error
    here) in that test, not in whichever test the collector happens to run in later."""
    yield
    gc.collect()


# -- the unit, as systemd reads it -------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """The unit's sections: their `Key=value` entries in order (a key may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):  # a continuation line: systemd joins it with a space
            logical += stripped[:-1] + " "
            continue
        logical, stripped = "", logical + stripped
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
            continue
        assert current is not None, f"an entry before any section: {stripped!r}"
        key, sep, value = stripped.partition("=")
        assert sep, f"not Key=value: {stripped!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service_value(entries: dict[str, list[tuple[str, str]]], key: str) -> str:
    """The value systemd takes for `key` in [Service]: the last one given."""
    values = [value for k, value in entries["Service"] if k == key]
    assert values, f"[Service] has no {key}="
    return values[-1]


def seconds(span: str) -> float:
    """A systemd time span ("60s", "1min 30s", "90") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and all(unit in units for _, unit in parts), f"not a time span: {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def venv_command() -> Path:
    """The `pulsar-rest` that pip installed beside this interpreter."""
    path = Path(sys.executable).parent / "pulsar-rest"
    assert path.is_file() and os.access(path, os.X_OK), f"no {path}: pip install -e . first"
    return path


NO_SUCH_USER = r"user.*pulsar-rest.*(does not exist|not found|unknown)"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    text = UNIT.read_text()
    installed = "ExecStart=/usr/local/bin/pulsar-rest "
    assert text.count(installed) == 1, "ExecStart runs the command pip installs in /usr/local/bin"
    # verify checks that ExecStart's binary exists: here, the one of this venv. The name
    # stays pulsar-rest.service, which verify also reads.
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(installed, f"ExecStart={venv_command()} "))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    # verify answers 0 even for an unknown key or a bad value (a line on stderr, the entry
    # ignored by systemd): every line is a failure, but one. The user is made at install
    # (useradd, see the unit's comments), not on the machine that checks the file, and
    # some versions of systemd say so.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and not re.search(NO_SUCH_USER, line, re.IGNORECASE)
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


# What systemd-analyze security finds open in the unit, each left so on purpose (the unit's
# comments say why): anything else open is a hardening option dropped, or a check of a
# newer systemd to decide on.
LEFT_OPEN = {
    "DeviceAllow=": "char-rtc:r, which ProtectClock= itself allows",
    "IPAddressDeny=": "deploys reach their hosts and the git server",
    "PrivateNetwork=": "likewise",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "likewise",
    "RestrictAddressFamilies=~AF_UNIX": "the notify socket, ssh-agent",
    "RestrictAddressFamilies=~AF_NETLINK": "glibc's getaddrinfo",
    "MemoryDenyWriteExecute=": "Ruby's JIT, libffi",
    "PrivateUsers=": "a root-owned ~/.ssh/config would be nobody's, which ssh refuses",
    "ProcSubset=": "psutil reads /proc/stat",
    "ProtectProc=": "a task's non-dumpable ssh would hide from pulsar-rest's kill",
    "RootDirectory=/RootImage=": "the host's ruby, git and ssh",
    "SystemCallFilter=~@privileged": "rsync -a sets groups (chown)",
    "SystemCallFilter=~@resources": "nice and ionice",
    "UMask=": "0027: the group pulsar-rest may read the history (backups)",
}


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own report: every check passes but those left open on purpose, and the
    exposure (0 to 10, lower is safer) stays in its "OK" band."""
    analyze = tool("systemd-analyze", "systemd")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/pulsar-rest ", f"{venv_command()} "))
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    report = done.stdout + done.stderr
    passed = re.findall(r"^✓ (\S+)", done.stdout, re.MULTILINE)
    open_ = re.findall(r"^✗ (\S+)", done.stdout, re.MULTILINE)
    for name in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "User=/DynamicUser="):
        assert name in passed, report
    assert sorted(set(open_) - set(LEFT_OPEN)) == [], report
    found = re.search(r"Overall exposure level for pulsar-rest\.service: (\d+\.\d+) (\w+)", done.stdout)
    assert found, report
    assert float(found.group(1)) <= 2.5 and found.group(2) == "OK", found.group(0)


def test_the_unit_runs_pulsar_rest_as_a_notifying_service_with_its_state_and_a_graceful_stop() -> None:
    """The unit's command line, read by pulsar-rest itself with the example settings (what
    the install copies to /etc/pulsar-rest/pulsar-rest.yml): its data in the state
    directory, on the port the nginx site proxies to, and a stop timeout that lets the
    shutdown grace and the kill after it run to their end."""
    entries = unit_entries(UNIT.read_text())
    assert service_value(entries, "Type") == "notify"
    assert service_value(entries, "KillMode") == "mixed"  # SIGTERM to pulsar-rest, not to the deploys
    assert service_value(entries, "Restart") == "on-failure"
    argv = service_value(entries, "ExecStart").split()
    assert argv[0] == "/usr/local/bin/pulsar-rest"
    config = argv.index("--config") + 1
    assert argv[config] == "/etc/pulsar-rest/pulsar-rest.yml"
    argv[config] = str(EXAMPLE_CONFIG)
    settings = load_settings(argv[1:], environ={})
    assert settings.data_dir == Path("/var/lib") / service_value(entries, "StateDirectory")
    stop_timeout = seconds(service_value(entries, "TimeoutStopSec"))
    needed = settings.shutdown_grace + settings.kill_grace
    assert stop_timeout > needed, f"TimeoutStopSec={stop_timeout:g}s, the stop may need {needed:g}s"
    upstream = re.search(r"^\s*server\s+([\d.]+):(\d+)\b", SITE.read_text(), re.MULTILINE)
    assert upstream, "the nginx site names its upstream server"
    assert (settings.host, settings.port) == (upstream.group(1), int(upstream.group(2)))


# -- sd_notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where systemd would listen; pulsar-rest started now is told of it."""
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "a unix socket's path has room for 107 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # start() passes this environment on
        yield sock


def receive(sock: socket.socket, proc: subprocess.Popen[str]) -> dict[str, str]:
    """The next notification, as its fields; a failure if the process ends first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            lines = sock.recv(4096).decode().split("\n")
            return dict(line.partition("=")[::2] for line in lines if line)
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=TIMEOUT)
            raise AssertionError(f"pulsar-rest exited ({proc.returncode}) without notifying: {err}")
    raise AssertionError("no notification in time")


def pending(sock: socket.socket) -> list[bytes]:
    """The notifications already queued, without waiting."""
    got: list[bytes] = []
    while select.select([sock], [], [], 0)[0]:
        got.append(sock.recv(4096))
    return got


def test_pulsar_rest_notifies_ready_once_listening_and_stopping_on_sigterm(
    start: Start, notify_socket: socket.socket, tmp_path: Path
) -> None:
    proc = start()
    log = tmp_path / "logs" / "pulsar-rest.log"
    ready = receive(notify_socket, proc)
    assert ready.get("READY") == "1", ready
    assert ready.get("MAINPID") == str(proc.pid), ready  # the python process, not a wrapper
    listening = re.search(r"(http://127\.0\.0\.1:(\d+)/)", ready.get("STATUS", ""))
    assert listening, ready
    # At once: the port is open by the time READY=1 comes.
    with socket.create_connection(("127.0.0.1", int(listening.group(2))), timeout=TIMEOUT):
        pass  # systemd may start what needs pulsar-rest now: it answers
    wait_for(lambda: f"listening on {listening.group(1)}" in log.read_text(), proc, "the log's line")
    assert not pending(notify_socket), "one READY=1"
    stop(proc)  # SIGTERM, as systemd stops the unit; exits 0
    assert [datagram.decode() for datagram in pending(notify_socket)] == ["STOPPING=1"]


def test_a_failed_start_never_notifies_ready(
    start: Start, notify_socket: socket.socket, busy_port: int
) -> None:
    """systemd must see the start fail (exit 2), never a service it believes is up."""
    proc = start("--port", str(busy_port))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, err
    assert "Address already in use" in err
    assert pending(notify_socket) == []


def test_tasks_do_not_inherit_the_notify_socket(
    start: Start, notify_socket: socket.socket, tmp_path: Path
) -> None:
    proc = start()
    base = f"http://127.0.0.1:{listening_port(tmp_path / 'logs' / 'pulsar-rest.log', proc)}"
    task = call(f"{base}/app/prod", {"action": "env[NOTIFY_SOCKET]"})["task"]
    output = call(f"{base}/task/{ended(base, task['id'])['id']}")["output"]
    stop(proc)
    assert json.loads(output.splitlines()[0]) == {"NOTIFY_SOCKET": None}


# -- nginx in front ---------------------------------------------------------------------


def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    """`nginx -t` on the site as it is, but for its certificate and addresses (nginx -t
    binds them): no error, no warning. Its timeouts outlast pulsar-rest's waits."""
    nginx = tool("nginx", "nginx")
    config = main_config(tmp_path, site_on_loopback(free_port(), free_port(), 8001))
    done = subprocess.run(
        [*nginx_argv(nginx, tmp_path, config), "-t", "-q"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    settings = load_settings(["--config", str(EXAMPLE_CONFIG)], environ={})
    longest = max(settings.long_poll_timeout, settings.keepalive)
    timeouts = re.findall(r"^\s*proxy_read_timeout\s+(\w+);", SITE.read_text(), re.MULTILINE)
    assert timeouts, "the site sets proxy_read_timeout (nginx's default is 60 s)"
    for timeout in timeouts:  # nginx writes its time spans as systemd does ("75s", "2m")
        assert seconds(timeout) > longest, f"proxy_read_timeout {timeout}: a wait lasts {longest:g}s"


@dataclass
class Proxy:
    """nginx on loopback with the site, in front of a running pulsar-rest."""

    https: int  # nginx's TLS port
    http: int  # nginx's plain port (the redirect)
    upstream: int  # pulsar-rest's own port
    tls: ssl.SSLContext  # a client that trusts the development certificate only

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https}{path}"

    def direct(self, path: str) -> dict[str, Any]:
        """GET `path` from pulsar-rest itself, past nginx."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.upstream}{path}", timeout=TIMEOUT) as resp:
            answer: dict[str, Any] = json.load(resp)
        return answer


@pytest.fixture
def proxy(start: Start, gates: Path, tmp_path: Path) -> Iterator[Proxy]:
    tool("nginx", "nginx")  # skipped (or failed in CI) before a server is started
    # A test that fails with a task still at its gate: the stop kills it at once, not in 30 s.
    server = start("--shutdown-grace", "0.5", "--kill-grace", "0.5")
    upstream = listening_port(tmp_path / "logs" / "pulsar-rest.log", server)
    https, http = free_port(), free_port()
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    with nginx_running(tmp, site_on_loopback(https, http, upstream), https):
        yield Proxy(https, http, upstream, ssl.create_default_context(cafile=str(CERT)))
    stop(server)


@pytest.fixture
async def session(proxy: Proxy) -> AsyncIterator[aiohttp.ClientSession]:
    # Every read has a deadline: a proxy that holds an answer back (a buffer) fails the test
    # in seconds, not at aiohttp's 5-minute default.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=DEADLINE, sock_read=DEADLINE)
    connector = aiohttp.TCPConnector(ssl=proxy.tls)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def create(session: aiohttp.ClientSession, proxy: Proxy, action: str) -> dict[str, Any]:
    async with session.post(proxy.url("/app/prod"), json={"action": action}) as resp:
        assert resp.status == 200, await resp.text()
        # pulsar-rest sees plain HTTP; the site makes its Location https.
        assert resp.headers["Location"].startswith("https://127.0.0.1/task/"), resp.headers["Location"]
        task: dict[str, Any] = (await resp.json())["task"]
        return task


async def get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def waiting(proxy: Proxy) -> None:
    """Until a client waits for news in pulsar-rest (its /status counts them), with a deadline."""
    await eventually(lambda: proxy.direct("/status")["waiters"] >= 1, DEADLINE, "a waiting client")


async def test_a_long_poll_through_nginx_waits_and_answers(
    proxy: Proxy, session: aiohttp.ClientSession, gates: Path
) -> None:
    task = await create(session, proxy, "gate[poll]")
    first = await get(session, proxy.url(f"/task/{task['id']}/output?offset=0"))
    assert first["output"] == "waiting for poll\n"
    poll = asyncio.ensure_future(
        get(session, proxy.url(f"/task/{task['id']}/output?offset={first['nextOffset']}&timeout=25"))
    )
    try:
        await waiting(proxy)  # the long-poll has passed nginx and waits in pulsar-rest
        assert not poll.done()
        release(gates, "poll")
        answer = await asyncio.wait_for(poll, DEADLINE)
    finally:
        poll.cancel()
    assert answer["offset"] == first["nextOffset"]
    assert answer["output"].startswith("passed poll\n")


async def sse_event(resp: aiohttp.ClientResponse) -> tuple[str, Any]:
    """The next event of an SSE stream (comments skipped): its name and data."""
    name, data = "", ""
    async with asyncio.timeout(DEADLINE):
        while True:
            line = (await resp.content.readline()).decode()
            assert line, "the stream ended"
            if line == "\n" and name:
                return name, json.loads(data)
            if line.startswith("event: "):
                name = line[len("event: ") :].strip()
            elif line.startswith("data: "):
                data += line[len("data: ") :]


async def test_a_stream_through_nginx_passes_each_event_as_it_is_sent(
    proxy: Proxy, session: aiohttp.ClientSession, gates: Path
) -> None:
    task = await create(session, proxy, "gate[stream]")
    async with session.get(proxy.url(f"/task/{task['id']}/stream")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Encoding" not in resp.headers  # not gzipped: gzip holds bytes back
        seen: list[str] = []
        while "waiting for stream\n" not in "".join(seen):
            name, data = await sse_event(resp)
            if name == "output":
                seen.append(data["output"])
        # That event came while the task still waits for the gate: nginx passed it on at once
        # (a buffer would hold it until the task wrote more or ended).
        assert not (gates / "stream").exists()
        assert (await asyncio.to_thread(proxy.direct, f"/task/{task['id']}"))["status"] == "running"
        release(gates, "stream")
        while True:
            name, data = await sse_event(resp)
            if name == "output":
                seen.append(data["output"])
            if name == "end":
                break
    assert data["status"] == "finished"
    assert "".join(seen).startswith("waiting for stream\npassed stream\n")


async def test_a_websocket_through_nginx(proxy: Proxy, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(f"wss://127.0.0.1:{proxy.https}/websocket") as ws:
        raw = ws.get_extra_info("socket")
        # Connected: the upgrade went through nginx (HTTP/1.1 to pulsar-rest, both headers).
        await waiting(proxy)  # the socket waits in pulsar-rest: what follows is news to it
        task = await create(session, proxy, "lines[3]")
        events: list[dict[str, Any]] = []
        output = ""
        async with asyncio.timeout(DEADLINE):
            while not events or events[-1].get("status") != "finished":
                message = await ws.receive_json()
                if message["event"] == "task.output":
                    output += message["output"]
                else:
                    events.append(message)
    # The socket's TLS shutdown ends after the close, on its own: not after this test's loop
    # (its transport would be collected unclosed, a warning that fails a later test).
    await eventually(lambda: raw.fileno() == -1, DEADLINE, "the WebSocket's connection to close")
    assert events[0]["event"] == "task.create" and events[0]["task"]["id"] == task["id"]
    assert output.startswith("line 1\nline 2\nline 3\n")


def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """A bare TLS handshake, the certificate checked: the protocol agreed (a refusal
    raises). A blocking socket, closed however the handshake ends."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version = tls.version()
        assert version is not None
        return version


async def test_nginx_speaks_tls_1_3_only_and_sends_http_to_https(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    assert handshake(proxy.https, proxy.tls) == "TLSv1.3"
    old = ssl.create_default_context(cafile=str(CERT))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError) as refused:
        handshake(proxy.https, old)
    # nginx's alert, not a failure of the client's own (its checks of the certificate).
    assert "PROTOCOL_VERSION" in str(refused.value), refused.value
    async with session.get(proxy.url("/status")) as resp:
        assert resp.status == 200
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
    async with session.get(f"http://127.0.0.1:{proxy.http}/tasks?page=2", allow_redirects=False) as resp:
        assert resp.status == 301
        assert resp.headers["Location"] == "https://127.0.0.1/tasks?page=2"
