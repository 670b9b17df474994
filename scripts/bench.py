"""Benchmark pulsar-rest on loopback with the fake pulsar, and print a Markdown table.

    scripts/bench              # every scenario (a few minutes)
    scripts/bench 1 4          # only scenarios 1 and 4
    scripts/bench --quick      # smaller counts, to check the script itself
    scripts/bench --profile d  # also record each server with py-spy (collapsed stacks in d/)
    scripts/bench --against /tmp/before  # scenario 5 beside another checkout, interleaved
    BENCH_HISTORY=100000 scripts/bench 8  # scenario 8 on 100,000 ended tasks, not 1,000,000

Each scenario starts a fresh server (`python -m pulsar_rest`) in its own data directory
(scenario 8: on a history of ended tasks written into SQLite beforehand, and on an empty one;
scenario 9: two servers on a PostgreSQL cluster of Debian's server, started for it);
clients run in this process. Long-poll clients speak raw HTTP/1.1 over asyncio streams so
that the client's own cost stays small beside the server's. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_pulsar.py"
sys.path.insert(0, str(ROOT / "tests"))
# This tree's pulsar_rest, the one its server runs (`python -m` from ROOT), not the one the
# virtualenv's editable install points at (maybe another worktree's, of another schema).
sys.path.insert(0, str(ROOT))
from fake_pulsar import bench_block  # noqa: E402
from postgres import Cluster, Missing, server_bin  # noqa: E402

from pulsar_rest import store  # noqa: E402

MiB = 1024 * 1024


@dataclass
class Row:
    scenario: str
    figure: str
    value: str
    target: str = ""
    ok: bool | None = None


ROWS: list[Row] = []


def row(scenario: str, figure: str, value: str, target: str = "", ok: bool | None = None) -> None:
    ROWS.append(Row(scenario, figure, value, target, ok))
    mark = "" if ok is None else (" ok" if ok else " MISSED")
    print(f"  {figure}: {value}{(' (target ' + target + ')') if target else ''}{mark}", flush=True)


# --- the server -------------------------------------------------------------------------


# A fake pulsar in the shell: what a task costs the service, not Python's start-up (about
# 20 ms, which would dominate both sides of a comparison with plain spawning).
# `pulsar task APP ENV hold` holds its app and environment until the server stops.
SHELL_FAKE = """#!/bin/sh
[ "$4" = hold ] && exec sleep 600
echo "pulsar task $2 $3 $4"
echo "done"
"""


# A start that never comes ends the run instead of hanging it; generous, for a server that
# loads a long history before it listens.
START_TIMEOUT = 300.0


class Server:
    def __init__(
        self, work: Path, *extra: str, fake: str | None = None, data: Path | None = None, root: Path = ROOT
    ) -> None:
        self.work = work
        self.gates = work / "gates"
        self.gates.mkdir(parents=True, exist_ok=True)
        wrapper = work / "pulsar"
        wrapper.write_text(fake or f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        wrapper.chmod(0o755)
        self.pulsar = str(wrapper)
        env = {**os.environ, "FAKE_PULSAR_DIR": str(self.gates)}
        self.launched = time.monotonic()
        # python -m runs the package of its working directory: `root`'s.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulsar_rest", "--port", "0", "--pulsar-bin", self.pulsar,
             "--data-dir", str(data or work / "data"), "--long-poll-timeout", "300", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        watchdog = threading.Timer(START_TIMEOUT, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
                if found:
                    self.port = int(found.group(1))
                    break
            else:
                code = self.proc.wait()
                if code == -signal.SIGKILL:  # by the watchdog
                    raise SystemExit(f"the server was not listening after {START_TIMEOUT:.0f} s")
                raise SystemExit(f"the server did not start: {code}")
        finally:
            watchdog.cancel()
        # Keep reading its log, or the pipe fills and the server blocks; keep the end of it.
        self.log: deque[str] = deque(maxlen=40)
        threading.Thread(target=self.log.extend, args=(self.proc.stdout,), daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def release(self, gate: str) -> None:
        (self.gates / gate).touch()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


PROFILE_DIR: Path | None = None


@contextlib.contextmanager
def server(
    *extra: str, fake: str | None = None, data: Path | None = None, root: Path = ROOT
) -> Iterator[Server]:
    """A server in a temporary directory of its own; its data directory is `data` if given
    (a history made beforehand), else a new one in there; the code of the checkout `root`."""
    with tempfile.TemporaryDirectory(prefix="pulsar-bench-") as tmp:
        srv = Server(Path(tmp), *extra, fake=fake, data=data, root=root)
        spy = None
        failed = True
        if PROFILE_DIR is not None:
            out = PROFILE_DIR / f"server-{len(list(PROFILE_DIR.glob('server-*')))}.txt"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(srv.proc.pid), "--rate", "250", "--format", "raw",
                 "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            yield srv
            failed = False
        finally:
            if failed:
                print(f"the server said, last (exit code {srv.proc.poll()}):", *srv.log, sep="\n  ")
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            srv.stop()


class RssPeak:
    """Samples a process's RSS in a thread (every 20 ms) and keeps the highest value."""

    def __init__(self, srv: Server) -> None:
        self.srv, self.peak, self._stop = srv, srv.rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.srv.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.srv.rss())


# --- raw HTTP/1.1 -----------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length, head
    return status, await reader.readexactly(int(length.group(1)))


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def api(session: aiohttp.ClientSession, srv: Server, method: str, path: str, **kw: Any) -> Any:
    async with session.request(method, srv.url + path, **kw) as resp:
        assert resp.status < 300, (resp.status, await resp.text())
        return await resp.json()


async def wait_for_waiters(session: aiohttp.ClientSession, srv: Server, count: int) -> None:
    async def waiting() -> int:
        return int((await api(session, srv, "GET", "/status"))["waiters"])

    await wait_for_count(waiting, count, "the server")


async def wait_for_count(read: Callable[[], Awaitable[int]], count: int, who: str) -> None:
    """Poll `read()` until it says `count` waiters wait (the setup of a run, not a figure)."""
    deadline = time.monotonic() + 120
    while await read() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{who} never had {count} waiters")
        await asyncio.sleep(0.05)


def percentiles(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms"


class Waiter(asyncio.Protocol):
    """One long-poll on its own keep-alive connection, as lean as a client can be: it notes
    the time its whole answer arrived, so the latency measured is the server's."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.buffer = bytearray()
        self.done: asyncio.Future[tuple[int, bytes, float]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(request(self.path))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head) if sep else None
        if length and len(body) >= int(length.group(1)) and not self.done.done():
            self.done.set_result((int(head.split(b" ", 2)[1]), bytes(body), time.time()))
            # The connection stays open, as a long-poll client's does for its next poll: the
            # server's wake-up is measured, not 5,000 connections being torn down.

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the answer"))


async def open_waiters(port: int, path: str, count: int) -> list[asyncio.Future[tuple[int, bytes, float]]]:
    """`count` long-polls on `path`, each on its own connection, opened in batches (the
    listen backlog is finite), each resolving to (status, body, time received)."""
    loop = asyncio.get_running_loop()
    waiters: list[Waiter] = []
    for start in range(0, count, 250):
        batch = await asyncio.gather(
            *(
                loop.create_connection(lambda: Waiter(path), "127.0.0.1", port)
                for _ in range(min(250, count - start))
            )
        )
        waiters += [protocol for _, protocol in batch]
    return [w.done for w in waiters]


# --- scenarios --------------------------------------------------------------------------


async def output_waiters(count: int) -> None:
    print(f"1. {count} concurrent /task/:id/output long-polls on one running task", flush=True)
    with server() as srv:
        async with aiohttp.ClientSession() as session:
            task = (await api(session, srv, "POST", "/bench/prod", json={"action": "stamps[go]"}))["task"]
            await api(session, srv, "GET", f"/task/{task['id']}/output?offset=0")  # "waiting for go"
            polls = await open_waiters(srv.port, f"/task/{task['id']}/output", count)
            await wait_for_waiters(session, srv, count)
            rss = srv.rss()
            cpu = sum(srv.ps.cpu_times()[:2])
            srv.release("go")
            results = await asyncio.gather(*polls)
            cpu = sum(srv.ps.cpu_times()[:2]) - cpu
    bodies = [json.loads(body) for status, body, _ in results if status == 200]
    base = await minimal_long_polls(count, results[0][1])
    answered = sum(1 for b in bodies if b["changed"] and "stamp " in b["task"]["output"])
    stamp = float(re.search(r"stamp (\S+)", bodies[0]["task"]["output"]).group(1))  # type: ignore[union-attr]
    latencies = [received - stamp for _, _, received in results]
    p99 = sorted(latencies)[int(len(latencies) * 0.99)]
    row("1 output waiters", "answered", f"{answered} of {count}", f"{count}", answered == count)
    row("1 output waiters", "server RSS", f"{rss / MiB:.0f} MB", "< 250 MB", rss < 250 * MiB)
    row("1 output waiters", "wake-up latency", percentiles(latencies), "p99 < 250 ms", p99 < 0.25)
    row("1 output waiters", "server CPU time for the wake-up", f"{cpu * 1000:.0f} ms")
    baseline_rows("1 output waiters", latencies, base)


async def created_waiters(count: int) -> None:
    print(f"2. {count} concurrent /tasks/created long-polls and one creation", flush=True)
    with server() as srv:
        async with aiohttp.ClientSession() as session:
            polls = await open_waiters(srv.port, "/tasks/created", count)
            await wait_for_waiters(session, srv, count)
            rss = srv.rss()
            sent = time.time()
            await api(session, srv, "POST", "/bench/prod", json={"action": "ok"})
            results = await asyncio.gather(*polls)
    answered = sum(1 for status, body, _ in results if status == 200 and json.loads(body)["changed"])
    latencies = [received - sent for _, _, received in results]
    p99 = sorted(latencies)[int(len(latencies) * 0.99)]
    base = await minimal_long_polls(count, results[0][1])
    row("2 created waiters", "answered", f"{answered} of {count}", f"{count}", answered == count)
    row("2 created waiters", "server RSS", f"{rss / MiB:.0f} MB", "< 250 MB", rss < 250 * MiB)
    row(
        "2 created waiters",
        "wake-up latency (from the POST)",
        percentiles(latencies),
        "p99 < 250 ms",
        p99 < 0.25,
    )
    baseline_rows("2 created waiters", latencies, base)


async def creation_burst(count: int) -> None:
    print(f"3. a burst of {count} creations, then one client with since", flush=True)
    with server() as srv:
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = (await api(session, srv, "GET", "/status"))["seq"]
            await asyncio.gather(
                # One deploy at a time per app and environment: the burst spans 1,000 apps.
                *(api(session, srv, "POST", f"/burst-{i}/prod", json={"action": "ok"}) for i in range(count))
            )
            seen, cursor, more = 0, start, True
            while more:
                answer = await api(session, srv, "GET", f"/tasks/created?since={cursor}&timeout=0")
                seen += len(answer["tasks"])
                cursor, more = answer["next"], answer["more"]
    row("3 creation burst", "creations seen", f"{seen} of {count}", f"{count}", seen == count)


def expected_digest(size: int) -> tuple[str, int]:
    block = bench_block() * 16
    blocks = -(-size // len(block))
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)
    return digest.hexdigest(), blocks * len(block)


async def big_output(size: int) -> None:
    print(f"4. one task writing {size / MiB:.0f} MiB, then read back with offset polls", flush=True)
    want, total = expected_digest(size)
    with server() as srv:
        async with aiohttp.ClientSession() as session:
            peak = RssPeak(srv)
            before = srv.rss()
            started = time.monotonic()
            task = (await api(session, srv, "POST", "/bench/prod", json={"action": f"bytes[{size}]"}))["task"]
            while not (await api(session, srv, "GET", f"/task/{task['id']}/state?timeout=60"))["changed"]:
                pass
            ingest = time.monotonic() - started
            growth = peak.stop() - before
            digest, offset, started, polls = hashlib.sha256(), 0, time.monotonic(), 0
            while True:
                answer = await api(session, srv, "GET", f"/task/{task['id']}/output?offset={offset}")
                digest.update(answer["output"].encode())
                offset, polls = answer["nextOffset"], polls + 1
                if answer["complete"]:
                    break
            readback = time.monotonic() - started
    same = digest.hexdigest() == want and offset == total
    speed = total / MiB / ingest
    row(
        "4 big output",
        "ingested",
        f"{speed:.0f} MB/s ({total / MiB:.0f} MiB in {ingest:.1f} s)",
        "≥ 400 MB/s",
        speed >= 400,
    )
    row("4 big output", "server RSS growth", f"{growth / MiB:.0f} MB", "< 50 MB", growth < 50 * MiB)
    row("4 big output", "read back with offset", f"{total / MiB / readback:.0f} MB/s in {polls} polls")
    row("4 big output", "bytes identical, é intact across reads", "yes" if same else "NO", "yes", same)


async def short_tasks(count: int, concurrency: int = 20) -> None:
    print(f"5. {count} short tasks, {concurrency} at a time, beside plain spawning", flush=True)
    for name, fake in (("a shell fake", SHELL_FAKE), ("the Python fake", None)):
        ours, base, created = await short_task_rates(fake, count if fake else count // 4, concurrency)
        if fake:
            row(
                "5 short tasks",
                "a file's creation beside the data directory, before",
                f"{created * 1e6:.0f} µs",
            )
        ratio = ours / base
        figure = f"{name}: tasks per second"
        row("5 short tasks", figure, f"{ours:.0f} through pulsar-rest, {base:.0f} plain spawning")
        if fake:
            row("5 short tasks", f"{name}: ratio to plain spawning", f"{ratio:.2f}", "≥ 0.5", ratio >= 0.5)
        else:
            row("5 short tasks", f"{name}: ratio to plain spawning", f"{ratio:.2f}")
    latencies = await post_to_running(200 if count >= 200 else count)
    p99 = sorted(latencies)[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    row("5 short tasks", "POST to running, idle server, one at a time", percentiles(latencies))
    row("5 short tasks", "POST to running p99", f"{p99 * 1000:.1f} ms", "< 20 ms", p99 < 0.020)


async def short_task_rates(fake: str | None, count: int, concurrency: int) -> tuple[float, float, float]:
    """Tasks a second through the API, and plain spawning of the same executable; and the
    seconds a file's creation took beside the server's data directory, before."""
    with server(fake=fake) as srv:
        created = file_creation(srv.work / "probe")
        plain = plain_spawning(srv)
        # Plain spawning before and after ours, the better one kept: the machine's state
        # (page cache, other load) favours neither side.
        base = await rate(plain, count // 2, concurrency)
        ours = await api_task_rate(srv, count, concurrency)
        base = max(base, await rate(plain, count // 2, concurrency))
    return ours, base, created


def file_creation(where: Path, count: int = 200) -> float:
    """Seconds to create a file in the new directory `where`, as the server makes each
    task's log (the files stay: a removal now would slow the next creations). ext4 without
    a journal (this VM's) skips, one by one, the inodes freed in the last 30 s or more: after
    the clean-up of a run, 20 µs become 0.2-0.8 ms."""
    where.mkdir()
    start = time.perf_counter()
    for number in range(count):
        os.close(os.open(where / f"{number}.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
    return (time.perf_counter() - start) / count


def plain_spawning(srv: Server) -> Callable[[], Awaitable[None]]:
    """One start of the server's fake pulsar as plain asyncio does it, its output read."""
    argv = [srv.pulsar, "task", "bench", "prod", "ok"]

    async def plain() -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await proc.communicate()

    return plain


async def short_tasks_against(other: Path, count: int, rounds: int, concurrency: int = 20) -> None:
    """Scenario 5's shell fake through this checkout's server and through `other`'s, both up
    at once, in alternating runs with plain spawning after each: on this VM the machine's
    speed moves by a third within minutes, which hid changes of 10-20 % between runs made
    one after the other."""
    print(f"5. short tasks: this checkout beside {other}, {rounds} rounds of {count}", flush=True)
    with server(fake=SHELL_FAKE) as this, server(fake=SHELL_FAKE, root=other) as that:
        sides = {"this checkout": this, "the other": that}
        for srv in sides.values():
            await api_task_rate(srv, count // 5, concurrency)  # its first tasks, apart
        ratios: dict[str, list[float]] = {name: [] for name in sides}
        for turn in range(rounds):
            for name in list(sides) if turn % 2 == 0 else list(sides)[::-1]:
                ours = await api_task_rate(sides[name], count, concurrency)
                base = await rate(plain_spawning(sides[name]), count // 2, concurrency)
                ratios[name].append(ours / base)
                shown = f"{ours:.0f} tasks a second, plain {base:.0f}: {ours / base:.3f}"
                print(f"  round {turn + 1}, {name}: {shown}", flush=True)
    for name, values in ratios.items():
        shown = f"{statistics.median(values):.3f} ({min(values):.3f} to {max(values):.3f})"
        row("5 against", f"{name}: ratio to plain spawning, median of {rounds} rounds", shown)
    gains = [a / b for a, b in zip(*ratios.values(), strict=True)]
    shown = f"{statistics.median(gains):.3f} ({min(gains):.3f} to {max(gains):.3f})"
    row("5 against", "this checkout's ratio over the other's, median of the rounds", shown)


async def api_task_rate(srv: Server, count: int, concurrency: int) -> float:
    """Short tasks (`ok`) a second through the API, `concurrency` at a time, each POST
    answered once its task has ended; prints the server's CPU time a task."""
    # A raw HTTP/1.1 client on keep-alive connections, one app each (one deploy at a time
    # per app and environment): aiohttp's client would cost about as much as the server.
    apps = itertools.count()
    idle: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def through_api() -> None:
        if idle:
            app, reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            app = f"short-{next(apps)}"
        body = b'{"action": "ok", "wait": true}'
        writer.write(
            f"POST /{app}/prod HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # The answer comes once the task has ended (wait=true).
        status, answer = await read_response(reader)
        assert status == 200 and json.loads(answer)["task"]["status"] == "finished", answer
        idle.append((app, reader, writer))

    before = srv.ps.cpu_times()
    try:
        ours = await rate(through_api, count, concurrency)
    finally:
        for _, _, writer in idle:
            writer.close()
    after = srv.ps.cpu_times()
    user, system = ((a - b) / count * 1000 for a, b in zip(after[:2], before[:2], strict=True))
    print(f"  the server's CPU time a task: {user + system:.2f} ms (user {user:.2f}, system {system:.2f})")
    return ours


async def post_to_running(count: int) -> list[float]:
    with server(fake=SHELL_FAKE) as srv:
        return await posts_to_running(srv, count)


async def posts_to_running(srv: Server, count: int) -> list[float]:
    """From sending a POST to the answer that says the task runs, one task at a time, each
    on its own app (its task holds it: the figure is the create, not the task). Once per
    server: the apps stay held until it stops."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            started = time.monotonic()
            answer = await api(session, srv, "POST", f"/idle-{i}/prod", json={"action": "hold"})
            latencies.append(time.monotonic() - started)
            assert answer["task"]["status"] == "running", answer["task"]
    return latencies


# --- 7: many followers of one task ----------------------------------------------------

FANOUT_SECONDS = 10.0
CLIENT_PROCESSES = 4  # followers are spread over processes: the clients are not the bottleneck
_STAMP = re.compile(rb"(\d{10}\.\d{6}) \d+ x")


async def fan_out(quick: bool) -> None:
    print("7. many followers of one task writing time-stamped lines", flush=True)
    seconds = 3.0 if quick else FANOUT_SECONDS
    runs = [("SSE", 200, 1_000_000), ("SSE", 200, 10_000_000), ("SSE", 1000, 100_000),
            ("long-poll", 200, 1_000_000), ("long-poll", 1000, 100_000)]  # fmt: skip
    if os.environ.get("BENCH_FANOUT"):  # e.g. "SSE,200,10000000": one run only
        kind, followers, asked = os.environ["BENCH_FANOUT"].split(",")
        runs = [(kind, int(followers), int(asked))]
    if quick:
        runs = [("SSE", 20, 1_000_000), ("long-poll", 20, 1_000_000)]
    with server() as srv:
        alone: dict[int, float] = {}
        for kind, followers, asked in runs:
            if asked not in alone:
                alone[asked] = (await paced_task(srv, asked, seconds, kind, 0))[0]
            before = srv.rss()
            peak = RssPeak(srv)
            real, lags, catch_ups, problems = await paced_task(srv, asked, seconds, kind, followers)
            top = peak.stop()
            # Once the followers have gone and what they held was given back: the RSS is read
            # until it is back within the target of the start, for 5 s at most.
            gone = time.monotonic()
            # Another process's memory: nothing to wait on but its readings.
            while (after := srv.rss()) - before >= 20 * MiB and time.monotonic() < gone + 5:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            settled = time.monotonic() - gone
            name = f"7 {followers} {kind} followers, {asked / 1e6:g} MB/s"
            ratio = real / alone[asked]
            rate_target = followers == 200 and asked >= 1_000_000
            shown = f"{real / 1e6:.2f} MB/s, {ratio:.2f} of {alone[asked] / 1e6:.2f}"
            row(name, "task's rate beside alone", shown, "≥ 0.95" if rate_target else "",
                ratio >= 0.95 if rate_target else None)  # fmt: skip
            p99 = sorted(lags)[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else float("inf")
            lag_target = (followers == 200 and asked == 1_000_000) or (followers == 1000 and asked == 100_000)
            row(name, "lag", percentiles(lags) if lags else "none received",
                "p99 < 250 ms" if lag_target else "", p99 < 0.25 if lag_target else None)  # fmt: skip
            row(name, "catch-up of a late join", percentiles(catch_ups) if catch_ups else "none")
            memory = (
                f"{top / MiB:.0f} MiB, {after / MiB:.0f} MiB after {settled:.1f} s (start {before / MiB:.0f})"
            )
            row(name, "server RSS peak, after", memory, "< 300 MiB, within 20 of the start",
                top < 300 * MiB and after - before < 20 * MiB)  # fmt: skip
            row(name, "every byte once, in order", "yes" if not problems else "; ".join(problems[:3]),
                "yes", not problems)  # fmt: skip


async def paced_task(
    srv: Server, rate: int, seconds: float, kind: str, followers: int
) -> tuple[float, list[float], list[float], list[str]]:
    """Run a task writing `rate` bytes a second for `seconds` with `followers` following it;
    its real rate, the followers' lags and catch-ups (see follower_client), and what went
    wrong."""
    async with aiohttp.ClientSession() as session:
        app = f"fan-{time.monotonic_ns()}"
        task = (await api(session, srv, "POST", f"/{app}/prod", json={"action": f"paced[{rate},{seconds}]"}))[
            "task"
        ]
        clients = []
        if followers:
            per = -(-followers // CLIENT_PROCESSES)
            for start in range(0, followers, per):
                clients.append(await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--follow", str(srv.port), str(task["id"]), kind,
                    str(min(per, followers - start)), stdout=asyncio.subprocess.PIPE,
                ))  # fmt: skip
        results = [json.loads((await client.communicate())[0]) for client in clients]
        while not (await api(session, srv, "GET", f"/task/{task['id']}/state?timeout=60"))["changed"]:
            pass
        ended = await api(session, srv, "GET", f"/task/{task['id']}")
    wrote = re.search(r"wrote (\d+) bytes in ([\d.]+) s, ([\d.]+) s of it in writes", ended["output"])
    assert wrote, ended["output"][-300:]
    lags = [lag for result in results for lag in result["lags"]]
    catch_ups = [catch_up for result in results for catch_up in result["catch_ups"]]
    problems = [problem for result in results for problem in result["problems"]]
    for result in results:
        for got in result["sizes"]:
            if got != ended["outputSize"]:
                problems.append(f"a follower got {got} bytes of {ended['outputSize']}")
    size, seconds, waited = int(wrote.group(1)), float(wrote.group(2)), float(wrote.group(3))
    # A client process busy all the time is a bottleneck of its own: the lags then say more
    # about the clients than about the server.
    busy = ", ".join(f"{result['busy']:.0%}" for result in results)
    print(f"  ({followers} {kind}: the task's writes waited {waited:.2f} s of {seconds:.1f}; ", end="")
    print(f"clients busy {busy})" if busy else "no client)")
    return size / seconds, lags, catch_ups, problems


async def follower_client(port: int, task_id: int, kind: str, count: int) -> None:
    """A client process: `count` followers of the task on raw HTTP, checking that the byte
    offsets follow each other, and sampling the lag of each message's last line.

    The followers start after the task, as people open a deploy's console, so each first
    gets what the task wrote before it joined. A line written before the join cannot reach
    the follower sooner than its age at the join, whatever the server does: it is no lag of
    the server's, and only the lines written after the join are sampled. The catch-up is the
    time from the join to the first message that carries such a line."""
    lags: list[float] = []
    catch_ups: list[float] = []
    problems: list[str] = []
    sizes: list[int] = []

    def sample(now: float, stamps: list[bytes], joined: float, caught_up: bool) -> bool:
        """Sample a message's last line; whether the follower has caught up."""
        if not stamps or float(stamps[-1]) < joined:
            return caught_up
        lags.append(now - float(stamps[-1]))
        if not caught_up:
            catch_ups.append(now - joined)
        return True

    async def sse() -> None:
        joined = time.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # HTTP/1.0: the body is the events as they are, not chunked.
        writer.write(f"GET /task/{task_id}/stream?offset=0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        buffer, offset, caught_up = b"", 0, False
        while chunk := await reader.read(1 << 20):
            now = time.time()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"event: output\n"):
                    continue
                head, _, data = event.partition(b"\ndata: ")
                start = int(re.search(rb'"offset": (\d+)', data[:40]).group(1))  # type: ignore[union-attr]
                if start != offset:
                    problems.append(f"offset {start} after {offset}")
                offset = int(head.rpartition(b"id: ")[2])
                caught_up = sample(now, _STAMP.findall(data[-300:]), joined, caught_up)
        writer.close()
        sizes.append(offset)

    async def long_poll() -> None:
        joined = time.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        offset, caught_up = 0, False
        while True:
            path = f"/task/{task_id}/output?offset={offset}&timeout=30"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status, body = await read_response(reader)
            now = time.time()
            if status != 200:
                problems.append(f"status {status}")
                break
            start = int(re.search(rb'"offset": (\d+)', body).group(1))  # type: ignore[union-attr]
            if start != offset:
                problems.append(f"offset {start} after {offset}")
            offset = int(re.search(rb'"nextOffset": (\d+)', body).group(1))  # type: ignore[union-attr]
            stamps = _STAMP.findall(body[max(0, body.find(b'"offset"') - 300) : body.find(b'"offset"')])
            caught_up = sample(now, stamps, joined, caught_up)
            if b'"complete": true' in body:
                break
        writer.close()
        sizes.append(offset)

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*((sse if kind == "SSE" else long_poll)() for _ in range(count)))
    busy = (time.process_time() - cpu) / (time.monotonic() - started)
    found = {"lags": lags, "catch_ups": catch_ups, "problems": problems, "sizes": sizes, "busy": busy}
    print(json.dumps(found))


async def rate(job: Callable[[], Awaitable[None]], count: int, concurrency: int) -> float:
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            await job()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.monotonic() - started)


# The least an aiohttp server can do for a long-poll: handlers waiting on one asyncio.Event,
# set by POST /go, each answering a body given once (of the size of ours). Run in the same
# conditions as ours (no access log; its own process), it is the floor of a wake-up on this
# machine, whatever the service does.
MINIMAL_LONG_POLL = """
import asyncio, sys
from aiohttp import web
body = open(sys.argv[1], "rb").read()
go = asyncio.Event()
waiting = 0
async def wait(request):
    global waiting
    waiting += 1
    await go.wait()
    return web.Response(body=body, content_type="application/json")
async def release(request):
    go.set()
    return web.Response(text="ok")
async def count(request):
    return web.Response(text=str(waiting))
app = web.Application()
app.router.add_get("/wait", wait)
app.router.add_post("/go", release)
app.router.add_get("/count", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, handler_cancellation=True,
            print=lambda *a: print(*a, flush=True))
"""


async def minimal_long_polls(count: int, body: bytes) -> list[float]:
    """Wake-up latencies of `count` long-polls on MINIMAL_LONG_POLL, from the POST that
    releases them, with the same client as ours."""
    with (
        tempfile.TemporaryDirectory(prefix="pulsar-rest-bench-") as work,
        minimal_server(MINIMAL_LONG_POLL, Path(work), body) as port,
    ):
        polls = await open_waiters(port, "/wait", count)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"

            async def waiting() -> int:
                return int(await (await session.get(f"{url}/count")).text())

            await wait_for_count(waiting, count, "the minimal server")
            sent = time.time()
            await (await session.post(f"{url}/go")).read()
            results = await asyncio.gather(*polls)
    return [received - sent for _, _, received in results]


def baseline_rows(scenario: str, ours: list[float], base: list[float]) -> None:
    row(scenario, "a minimal aiohttp long-poll, same machine, same run", percentiles(base))
    p99 = sorted(ours)[int(len(ours) * 0.99)] / sorted(base)[int(len(base) * 0.99)]
    row(scenario, "p99 beside the minimal long-poll's", f"{p99:.2f} times")


MINIMAL_APP = """
import sys
from aiohttp import web
body = open(sys.argv[1], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/task/1", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=lambda *a: print(*a, flush=True))
"""


async def task_reads(seconds: float, connections: int = 50) -> None:
    print(
        f"6. GET /task/:id for {seconds:.0f} s on {connections} connections, beside a minimal handler",
        flush=True,
    )
    with server() as srv:
        async with aiohttp.ClientSession() as session:
            task = (await api(session, srv, "POST", "/bench/prod", json={"action": "ok"}))["task"]
            await api(session, srv, "GET", f"/task/{task['id']}/state?timeout=60")
            async with session.get(f"{srv.url}/task/{task['id']}") as resp:
                body = await resp.read()
        ours = await hammer(srv.port, f"/task/{task['id']}", seconds, connections)
        with minimal_server(MINIMAL_APP, srv.work, body) as port:
            base = await hammer(port, "/task/1", seconds, connections)
    ratio = ours / base
    row(
        "6 task reads",
        "requests per second",
        f"{ours:.0f} pulsar-rest, {base:.0f} minimal handler ({len(body)} B)",
    )
    row("6 task reads", "ratio to the minimal handler", f"{ratio:.2f}", "≥ 0.5", ratio >= 0.5)


@contextlib.contextmanager
def minimal_server(code: str, work: Path, body: bytes) -> Iterator[int]:
    """A baseline aiohttp server (`code`, run as its own process, answering `body`) on a
    free port, once it serves; its port."""
    (work / "body.json").write_bytes(body)
    with socket_free_port() as port:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(work / "body.json"), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Running on" in line:
                break
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def socket_free_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    yield port


async def hammer(port: int, path: str, seconds: float, connections: int) -> float:
    """Requests per second over `connections` keep-alive connections for `seconds`."""
    deadline = time.monotonic() + seconds
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = request(path)
        try:
            while time.monotonic() < deadline:
                writer.write(payload)
                status, _ = await read_response(reader)
                assert status == 200
                done += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    return done / (time.monotonic() - started)


# --- 8: a long history of ended tasks -------------------------------------------------

HISTORY_APPS = tuple(f"app{i}" for i in range(50))
HISTORY_ENVS = ("production", "staging", "qa")
# How a long-lived service's tasks end: mostly finished.
HISTORY_STATUSES = {"finished": 0.90, "failed": 0.08, "killed": 0.01, "interrupted": 0.01}
HISTORY_CREATORS = ("alice", "bob", "carol", "ci", None)
# Each kind of task (app, env, status, creator), numbered in this order: a task's kind is
# one small number, so the bench remembers a million tasks in 2 MB and knows every answer.
HISTORY_KINDS = tuple(itertools.product(HISTORY_APPS, HISTORY_ENVS, HISTORY_STATUSES, HISTORY_CREATORS))
HISTORY_STEP = 60.0  # seconds between two creations; the newest task was created just now
HISTORY_COLUMNS = (
    "id", "app", "env", "action", "command", "status", "created_at", "started_at", "finished_at",
    "pid", "exit_code", "signal", "kill_signal", "created_by", "killed_by", "created_seq",
    "state_seq", "output_size",
)  # fmt: skip
START_TARGET = 2.0
LATENCY_TARGET = 0.020
# Flags of its servers: held tasks are stopped at once when a server stops (the default
# grace, 30 s, is as long as the bench waits for a stop).
HISTORY_FLAGS = ("--shutdown-grace", "1")


def history_kinds(count: int) -> array[int]:
    """The kind of each task, id 1 first (index 0), drawn with the statuses' weights."""
    weights = [HISTORY_STATUSES[status] for _, _, status, _ in HISTORY_KINDS]
    drawn = random.Random(8).choices(range(len(HISTORY_KINDS)), weights, k=count)
    return array("H", drawn)


def history_rows(kinds: array[int]) -> Iterator[tuple[Any, ...]]:
    """The rows of HISTORY_COLUMNS, oldest first, ended long ago and without a log file."""
    rng = random.Random(9)
    commands = {
        (app, env): json.dumps(["pulsar", "task", app, env, "deploy"]) for app, env, _, _ in HISTORY_KINDS
    }
    first = time.time() - len(kinds) * HISTORY_STEP
    for index, kind in enumerate(kinds):
        app, env, status, creator = HISTORY_KINDS[kind]
        created = first + index * HISTORY_STEP
        started = created + rng.uniform(0.01, 0.2)
        finished = started + rng.uniform(5, 300)
        exit_code, sig, kill_signal, killed_by = {
            "finished": (0, None, None, None),
            "failed": (1, None, None, None),
            "killed": (None, "SIGTERM", "SIGTERM", creator or "alice"),
            "interrupted": (None, None, None, None),
        }[status]
        task_id = index + 1
        seq = (1 << 32) + 2 * task_id  # run 1's events
        created_at, started_at, finished_at = (
            datetime.fromtimestamp(moment, UTC).isoformat() for moment in (created, started, finished)
        )
        yield (
            task_id, app, env, "deploy", commands[app, env], status, created_at, started_at, finished_at,
            10_000 + task_id % 50_000, exit_code, sig, kill_signal, creator, killed_by, seq, seq + 1, 0,
        )  # fmt: skip


def build_history(data: Path, count: int) -> array[int]:
    """A data directory whose database holds `count` ended tasks, written straight into
    SQLite in the store's own schema (what a server of this tree would have left); the kind
    of each task."""
    unknown = set(HISTORY_COLUMNS) - set(store._COLUMNS.split(", "))
    assert not unknown, f"the store has no column {unknown}: the bench's history needs updating"
    kinds = history_kinds(count)
    data.mkdir(parents=True)
    db = sqlite3.connect(data / store.DB_NAME, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")  # a scratch file: a crash here loses nothing
        # The whole schema (indexes, and whatever tables or triggers it has), then the rows by
        # column name: the columns not named take their defaults.
        db.executescript(store._SCHEMA)
        db.execute("BEGIN")
        columns = ", ".join(HISTORY_COLUMNS)
        marks = ", ".join("?" * len(HISTORY_COLUMNS))
        db.executemany(f"INSERT INTO tasks ({columns}) VALUES ({marks})", history_rows(kinds))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?), ('run', 1)", (store.SCHEMA_VERSION,))
        db.execute("COMMIT")
        # AUTOINCREMENT keeps the highest id given: the server's next task is count + 1.
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
        assert last == (count,), f"sqlite_sequence says {last}, not {count}"
    finally:
        db.close()
    return kinds


def matching(kinds: array[int], query: dict[str, str]) -> list[int]:
    """The ids of the tasks `GET /tasks` with these filters answers, newest first."""
    names = ("app", "env", "status", "createdBy")
    fits = bytes(
        all(query.get(name, value) == value for name, value in zip(names, kind, strict=True))
        for kind in HISTORY_KINDS
    )
    return [index + 1 for index in range(len(kinds) - 1, -1, -1) if fits[kinds[index]]]


async def timed_gets(
    port: int, paths: Iterable[str], budget: float = float("inf")
) -> list[tuple[int, bytes, float]]:
    """GET each of `paths` in turn on one keep-alive connection (raw HTTP: the client costs
    little beside the server): status, body, seconds. Past `budget` seconds, it stops once
    3 are done: a slow server makes the figure, not an endless run."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    results: list[tuple[int, bytes, float]] = []
    began = time.monotonic()
    try:
        for path in paths:
            sent = time.monotonic()
            writer.write(request(path))
            status, body = await read_response(reader)
            results.append((status, body, time.monotonic() - sent))
            if len(results) >= 3 and time.monotonic() - began > budget:
                break
    finally:
        writer.close()
    return results


def p99(latencies: list[float]) -> float:
    return sorted(latencies)[min(len(latencies) - 1, int(len(latencies) * 0.99))]


async def start_server(data: Path, stack: contextlib.ExitStack) -> tuple[Server, float]:
    """A server on the data directory `data`, kept in `stack`; and the time from its launch
    until `GET /status` answered 200 (a server may listen before it can answer)."""
    async with aiohttp.ClientSession() as session:
        srv = stack.enter_context(server(*HISTORY_FLAGS, fake=SHELL_FAKE, data=data))
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{srv.url}/status") as resp:
                    if resp.status == 200:
                        return srv, time.monotonic() - srv.launched
            if srv.proc.poll() is not None or time.monotonic() - srv.launched > START_TIMEOUT:
                raise SystemExit(f"the server on {data} never answered GET /status with 200")
            await asyncio.sleep(0.01)


async def start_times(
    data: Path, runs: int, stack: contextlib.ExitStack, what: str
) -> tuple[Server, list[float]]:
    """Start a server on `data` up to `runs` times, each stopped but the last (kept in
    `stack`); each start's time. A start 10 times the target is not repeated: it is the
    figure already, and a repeat only makes the run longer."""
    times: list[float] = []
    while True:
        print(f"  starting a server on {what} ...", end="", flush=True)
        with contextlib.ExitStack() as this:
            srv, took = await start_server(data, this)
            times.append(took)
            print(f" answering in {took:.2f} s, RSS {srv.rss() / MiB:.0f} MB", flush=True)
            if len(times) == runs or took > 10 * START_TARGET:
                stack.enter_context(this.pop_all())
                return srv, times


def median_of(times: list[float]) -> str:
    shown = ", ".join(f"{t:.2f}" for t in times)
    return f"{statistics.median(times):.2f} s, median of {len(times)} ({shown})"


async def instances(quick: bool) -> None:
    """9. Two instances on one PostgreSQL (a cluster of Debian's server started here): a
    task's output followed through the instance that runs it and through the other one,
    which reads what the first ships to the database."""
    print("\n9. two instances on one PostgreSQL: output followed through either", flush=True)
    try:
        cluster = Cluster(server_bin())
    except Missing as missing:
        row("9 two instances", "skipped", f"{missing}")
        return
    seconds = 3.0 if quick else 10.0
    try:
        dsn = cluster.new_database()
        with server("--database", dsn) as a, server("--database", dsn) as b:
            async with aiohttp.ClientSession() as session:
                for rate in (100_000, 1_000_000):
                    name = f"9 two instances, {rate / 1e6:g} MB/s"
                    task = await api(
                        session, a, "POST", "/shop/prod", json={"action": f"paced[{rate},{seconds}]"}
                    )
                    lags = await asyncio.gather(
                        *(instance_follower(session, srv, task["task"]["id"]) for srv in (a, b))
                    )  # fmt: skip
                    if not all(lags):  # a follower that saw no line: a failure, not a traceback
                        row(name, "lines received through each", "none through one", "some", False)
                        continue
                    row(name, "lag through the instance running it", percentiles(lags[0]))
                    p99 = sorted(lags[1])[min(len(lags[1]) - 1, int(len(lags[1]) * 0.99))]
                    row(name, "lag through the other", percentiles(lags[1]), "p99 < 250 ms", p99 < 0.25)
    finally:
        cluster.stop()


async def instance_follower(session: aiohttp.ClientSession, srv: Server, task_id: int) -> list[float]:
    """Long-polls of the task's output by offset to its end; the lag of each answer's last
    line (its time stamp), and a check that the offsets follow each other."""
    lags: list[float] = []
    offset = 0
    while True:
        answer = await api(session, srv, "GET", f"/task/{task_id}/output?offset={offset}&timeout=30")
        now = time.time()
        assert answer["offset"] == offset, (answer["offset"], offset)
        if stamps := _STAMP.findall(answer["output"][-300:].encode()):
            lags.append(now - float(stamps[-1]))
        offset = answer["nextOffset"]
        if answer["complete"]:
            return lags


async def long_history(count: int, quick: bool) -> None:
    print(f"8. a history of {count:,} ended tasks: start, memory, lookups, lists, creates", flush=True)
    name = f"8 history of {count:,}"
    tasks = f"{count:,} tasks"
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pulsar-bench-history-") as tmp:
        big, empty = Path(tmp) / "big", Path(tmp) / "empty"
        began = time.monotonic()
        kinds = build_history(big, count)
        size = (big / store.DB_NAME).stat().st_size
        row(name, "history built in SQLite", f"{time.monotonic() - began:.1f} s, {size / MiB:.0f} MB")
        with contextlib.ExitStack() as running:
            # A new version may upgrade the schema at its first open (indexes, once): that is
            # its own figure, not the start's.
            with contextlib.ExitStack() as first:
                _, (took,) = await start_times(big, 1, first, f"{tasks} for the first time")
            row(name, "first start (schema upgrade, once)", f"{took:.2f} s")
            quiet, quiet_times = await start_times(empty, 3, running, "an empty history")
            quiet_rss = quiet.rss()
            srv, times = await start_times(big, 3, running, tasks)
            rss = srv.rss()
            row(name, "start, empty history", median_of(quiet_times))
            row(name, f"start, {tasks}", median_of(times), "< 2 s", statistics.median(times) < START_TARGET)
            memory = f"{rss / MiB:.0f} MB, {quiet_rss / MiB:.0f} MB: {(rss - quiet_rss) / MiB:+.0f} MB"
            row(
                name,
                f"RSS after start, {tasks} beside empty",
                memory,
                "within 20 MB",
                rss - quiet_rss < 20 * MiB,
            )
            await history_reads(srv, kinds, name, problems)
            await history_creates(srv, quiet, count, quick, name)
            row(name, f"RSS after these requests, {tasks} beside empty",
                f"{srv.rss() / MiB:.0f} MB, {quiet.rss() / MiB:.0f} MB")  # fmt: skip
    row(
        name,
        "answers right (totals, pages, counts, old tasks)",
        "; ".join(problems) or "yes",
        "yes",
        not problems,
    )


async def history_reads(srv: Server, kinds: array[int], name: str, problems: list[str]) -> None:
    """`GET /status`, `GET /task/:id` of old tasks and `GET /tasks` (filters, pages), each
    answer checked against the history as built."""
    count = len(kinds)
    statuses = Counter(HISTORY_KINDS[kind][2] for kind in kinds)
    answers = await timed_gets(srv.port, ["/status"] * 200)
    counts = json.loads(answers[0][1])["tasks"]
    if counts != dict(statuses):
        problems.append(f"/status counts {counts}, not {dict(statuses)}")
        print(f"  MISMATCH: {problems[-1]}")
    latencies = [took for _, _, took in answers]
    row(name, "GET /status", percentiles(latencies), "p99 < 20 ms", p99(latencies) < LATENCY_TARGET)

    # Old tasks at random: whatever a server keeps in memory, these are not in it.
    ids = random.Random(10).sample(range(1, count + 1), min(200, count))
    answers = await timed_gets(srv.port, [f"/task/{task_id}" for task_id in ids])
    for task_id, (status, body, _) in zip(ids, answers, strict=True):
        task = json.loads(body) if status == 200 else {}
        want = HISTORY_KINDS[kinds[task_id - 1]]
        got = (task.get("app"), task.get("env"), task.get("status"), task.get("createdBy"))
        # No log file: the task is there, with no output.
        if status != 200 or task["id"] != task_id or got != want or task["output"] != "":
            problems.append(f"GET /task/{task_id}: {status} {body[:200]!r}")
            print(f"  MISMATCH: GET /task/{task_id} answered {status} {body[:200]!r}, not {want}")
            break
    latencies = [took for _, _, took in answers]
    row(name, f"GET /task/:id, {len(ids)} old tasks at random", percentiles(latencies), "p99 < 20 ms",
        p99(latencies) < LATENCY_TARGET)  # fmt: skip

    # What the page and `pulsar-rest tasks` ask (output=false), and the default with each
    # task's output; pages: 1, 2, the middle one, the last one. The target is the API's
    # pages (50 tasks) at any depth and filter; a page of the most a client may ask for
    # (1,000 tasks, 450 KB of JSON) is shown without one: its cost is that of its thousand
    # tasks' JSON, the same whatever the history holds.
    queries: list[tuple[dict[str, str], str, int, bool]] = [
        ({}, "1", 50, True),
        ({}, "mid", 50, True),
        ({}, "1", 50, False),
        ({}, "2", 50, False),
        ({}, "mid", 50, False),
        ({}, "last", 50, False),
        ({}, "mid", 1000, False),
        ({"app": "app3"}, "1", 50, False),
        ({"app": "app3", "env": "production"}, "1", 50, False),
        ({"status": "failed"}, "1", 50, False),
        ({"status": "finished"}, "mid", 50, False),
        ({"createdBy": "alice"}, "mid", 50, False),
        ({"createdBy": "alice"}, "last", 50, False),
        ({"app": "app7", "createdBy": "bob", "status": "finished"}, "1", 50, False),
        ({"status": "running"}, "1", 50, False),
    ]
    worst: tuple[float, str] = (0.0, "")
    targeted = sum(size == 50 for _, _, size, _ in queries)
    for filters, which, size, with_output in queries:
        expected = matching(kinds, filters)
        pages = -(-len(expected) // size)
        page = {"1": 1, "2": 2, "mid": max(1, pages // 2), "last": max(1, pages)}[which]
        params = {**filters}
        if page != 1:
            params["page"] = str(page)
        if size != 50:
            params["pageSize"] = str(size)
        if not with_output:
            params["output"] = "false"
        path = f"/tasks?{urlencode(params)}" if params else "/tasks"
        answers = await timed_gets(srv.port, [path] * 30, budget=2.0)
        latencies = [took for _, _, took in answers]
        status, body, _ = answers[0]
        listed = json.loads(body) if status == 200 else {}
        want_ids = expected[(page - 1) * size : page * size]
        right = (
            all(status == 200 for status, _, _ in answers)
            and listed.get("total") == len(expected)
            and listed.get("pages") == pages
            and listed.get("ids") == want_ids
        )
        shown = f"{percentiles(latencies)} ({len(answers)} requests)"
        if not right:
            seen = {key: listed.get(key) for key in ("total", "pages")}
            problem = f"{path}: {status}, {seen}, not total {len(expected)}, pages {pages}"
            if listed.get("ids") != want_ids:
                problem += f" (ids {str(listed.get('ids'))[:80]}, not {str(want_ids)[:80]})"
            problems.append(problem)
            print(f"  MISMATCH: {problem}")
            shown += " MISMATCH"
        if size != 50:
            row(name, f"GET {path}", shown, "", None if right else False)
            continue
        worst = max(worst, (p99(latencies), path))
        row(name, f"GET {path}", shown, "p99 < 20 ms", right and p99(latencies) < LATENCY_TARGET)
    shown = f"{worst[0] * 1000:.1f} ms ({worst[1]})"
    row(
        name,
        f"GET /tasks: the worst p99 of {targeted} queries of 50 tasks",
        shown,
        "< 20 ms",
        worst[0] < LATENCY_TARGET,
    )


async def history_creates(srv: Server, quiet: Server, count: int, quick: bool, name: str) -> None:
    """Creates with the long history beside the empty one's: short tasks a second, and
    POST to running."""
    tasks = f"{count:,} tasks"
    # In turns, long history then empty then empty then long, the better of each kept: a
    # drift of the machine favours neither side.
    rates: dict[Server, float] = {srv: 0.0, quiet: 0.0}
    for each in (srv, quiet, quiet, srv):
        measured = await api_task_rate(each, 40 if quick else 500, 20)
        print(f"  ({tasks if each is srv else 'empty history'}: {measured:.0f} tasks a second)")
        rates[each] = max(rates[each], measured)
    ratio = rates[srv] / rates[quiet]
    row(name, "short tasks a second (shell fake, 20 at a time)",
        f"{rates[srv]:.0f} with {tasks}, {rates[quiet]:.0f} empty: {ratio:.2f}", "≥ 0.9 of the empty's",
        ratio >= 0.9)  # fmt: skip
    latencies = await posts_to_running(srv, 20 if quick else 200)
    quiet_latencies = await posts_to_running(quiet, 20 if quick else 200)
    row(
        name,
        f"POST to running, {tasks}",
        percentiles(latencies),
        "p99 < 20 ms",
        p99(latencies) < LATENCY_TARGET,
    )
    row(name, "POST to running, empty history", percentiles(quiet_latencies))


# --- the report -------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 1024**3
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )


def table() -> str:
    lines = ["| scenario | figure | measured | target | |", "|---|---|---|---|---|"]
    for r in ROWS:
        mark = "" if r.ok is None else ("met" if r.ok else "**missed**")
        lines.append(f"| {r.scenario} | {r.figure} | {r.value} | {r.target} | {mark} |")
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenarios", nargs="*", type=int, help="which scenarios (1-9); default all")
    parser.add_argument("--quick", action="store_true", help="small counts: a check of the script")
    parser.add_argument("--profile", type=Path, help="record each server with py-spy into this directory")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="CHECKOUT",
        help="scenario 5 only, through this checkout's server and CHECKOUT's at once, in alternating rounds "
        "(e.g. git worktree add /tmp/before HEAD~1)",
    )
    args = parser.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if PROFILE_DIR is not None:
        if shutil.which("py-spy") is None:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    scenarios: dict[int, Callable[[], Awaitable[None]]] = {
        1: lambda: output_waiters(200 if quick else 5000),
        2: lambda: created_waiters(200 if quick else 5000),
        3: lambda: creation_burst(50 if quick else 1000),
        4: lambda: big_output((32 if quick else 1024) * MiB),
        5: lambda: short_tasks(40 if quick else 1000),
        6: lambda: task_reads(1 if quick else 5),
        7: lambda: fan_out(quick),
        8: lambda: long_history(
            int(os.environ.get("BENCH_HISTORY") or (20_000 if quick else 1_000_000)), quick
        ),
        9: lambda: instances(quick),
    }
    if args.against is not None:
        if args.scenarios not in ([], [5]):
            parser.error("--against runs scenario 5 only")
        if not (args.against / "pulsar_rest" / "__main__.py").is_file():
            parser.error(f"--against {args.against}: not a checkout of pulsar-rest")
        scenarios = {
            5: lambda: short_tasks_against(args.against.resolve(), 200 if quick else 1500, 2 if quick else 6)
        }
    print(f"machine: {machine()}\n", flush=True)
    for number in args.scenarios or sorted(scenarios):
        await scenarios[number]()
    print(f"\nmachine: {machine()}\n\n{table()}")
    return 0 if all(r.ok is not False for r in ROWS) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--follow"]:  # a follower client of scenario 7
        port, task_id, kind, count = sys.argv[2:6]
        asyncio.run(follower_client(int(port), int(task_id), kind, int(count)))
        sys.exit(0)
    sys.exit(asyncio.run(main()))
