"""Benchmark pulsar-rest on loopback with the fake pulsar, and print a Markdown table.

    scripts/bench              # every scenario (a few minutes)
    scripts/bench 1 4          # only scenarios 1 and 4
    scripts/bench --quick      # smaller counts, to check the script itself
    scripts/bench --profile d  # also record each server with py-spy (collapsed stacks in d/)

Each scenario starts a fresh server (`python -m pulsar_rest`) in its own data directory;
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
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_pulsar.py"
sys.path.insert(0, str(ROOT / "tests"))
from fake_pulsar import bench_block  # noqa: E402

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


class Server:
    def __init__(self, work: Path, *extra: str, fake: str | None = None) -> None:
        self.work = work
        self.gates = work / "gates"
        self.gates.mkdir(parents=True, exist_ok=True)
        wrapper = work / "pulsar"
        wrapper.write_text(fake or f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        wrapper.chmod(0o755)
        self.pulsar = str(wrapper)
        env = {**os.environ, "FAKE_PULSAR_DIR": str(self.gates)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulsar_rest", "--port", "0", "--pulsar-bin", self.pulsar,
             "--data-dir", str(work / "data"), "--long-poll-timeout", "300", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise SystemExit(f"the server did not start: {self.proc.wait()}")
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
def server(*extra: str, fake: str | None = None) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="pulsar-bench-") as tmp:
        srv = Server(Path(tmp), *extra, fake=fake)
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
        ours, base = await short_task_rates(fake, count if fake else count // 4, concurrency)
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


async def short_task_rates(fake: str | None, count: int, concurrency: int) -> tuple[float, float]:
    """Tasks a second through the API, and plain spawning of the same executable."""
    with server(fake=fake) as srv:
        argv = [srv.pulsar, "task", "bench", "prod", "ok"]

        async def plain() -> None:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            await proc.communicate()

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

        # Plain spawning before and after ours, the better one kept: the machine's state
        # (page cache, other load) favours neither side.
        base = await rate(plain, count // 2, concurrency)
        before = srv.ps.cpu_times()
        ours = await rate(through_api, count, concurrency)
        after = srv.ps.cpu_times()
        base = max(base, await rate(plain, count // 2, concurrency))
        for _, _, writer in idle:
            writer.close()
    user, system = ((a - b) / count * 1000 for a, b in zip(after[:2], before[:2], strict=True))
    print(f"  the server's CPU time a task: {user + system:.2f} ms (user {user:.2f}, system {system:.2f})")
    return ours, base


async def post_to_running(count: int) -> list[float]:
    """From sending a POST to the answer that says the task runs, one task at a time, each
    on its own app (its task holds it: the figure is the create, not the task)."""
    latencies: list[float] = []
    with server(fake=SHELL_FAKE) as srv:
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
            real, lags, problems = await paced_task(srv, asked, seconds, kind, followers)
            top = peak.stop()
            # Once the followers have gone (and what they held was given back).
            await asyncio.sleep(1.0)  # the server's own release, not a synchronisation
            after = srv.rss()
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
            memory = f"{top / MiB:.0f} MiB, {after / MiB:.0f} MiB (start {before / MiB:.0f})"
            row(name, "server RSS peak, after", memory, "< 300 MiB, within 20 of the start",
                top < 300 * MiB and after - before < 20 * MiB)  # fmt: skip
            row(name, "every byte once, in order", "yes" if not problems else "; ".join(problems[:3]),
                "yes", not problems)  # fmt: skip


async def paced_task(
    srv: Server, rate: int, seconds: float, kind: str, followers: int
) -> tuple[float, list[float], list[str]]:
    """Run a task writing `rate` bytes a second for `seconds` with `followers` following it;
    its real rate, the followers' lags, and what went wrong."""
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
    return size / seconds, lags, problems


async def follower_client(port: int, task_id: int, kind: str, count: int) -> None:
    """A client process: `count` followers of the task on raw HTTP, checking that the byte
    offsets follow each other, and sampling the lag of each message's last line."""
    lags: list[float] = []
    problems: list[str] = []
    sizes: list[int] = []

    async def sse() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # HTTP/1.0: the body is the events as they are, not chunked.
        writer.write(f"GET /task/{task_id}/stream?offset=0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        buffer, offset = b"", 0
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
                stamps = _STAMP.findall(data[-300:])
                if stamps:
                    lags.append(now - float(stamps[-1]))
        writer.close()
        sizes.append(offset)

    async def long_poll() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        offset = 0
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
            if stamps:
                lags.append(now - float(stamps[-1]))
            if b'"complete": true' in body:
                break
        writer.close()
        sizes.append(offset)

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*((sse if kind == "SSE" else long_poll)() for _ in range(count)))
    busy = (time.process_time() - cpu) / (time.monotonic() - started)
    print(json.dumps({"lags": lags, "problems": problems, "sizes": sizes, "busy": busy}))


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
    parser.add_argument("scenarios", nargs="*", type=int, help="which scenarios (1-7); default all")
    parser.add_argument("--quick", action="store_true", help="small counts: a check of the script")
    parser.add_argument("--profile", type=Path, help="record each server with py-spy into this directory")
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
