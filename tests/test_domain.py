"""The pieces without HTTP: states, output decoding, events, names, pulsar's lines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from pulsar_rest import pulsar
from pulsar_rest.events import CursorGone, EventBus, EventKind, created_topic, state_topic, task_topic
from pulsar_rest.names import InvalidName, check_action, check_name
from pulsar_rest.output import ENDED_KEEP, LogWriter, OutputLog, complete_chars
from pulsar_rest.tasks import InvalidTransition, Task, TaskStatus
from pulsar_rest.turns import TurnBatch, run_then
from pulsar_rest.web import present
from tests.conftest import eventually


@pytest.fixture
def writer() -> Iterator[LogWriter]:
    writer = LogWriter()
    yield writer
    writer.close()


def _task(tmp_path: Path) -> Task:
    # States need no output: the log is never written.
    return Task(id=1, app="a", env="e", action="t", command=["pulsar"], output=cast(OutputLog, None))


def test_task_moves_created_running_finished(tmp_path: Path) -> None:
    task = _task(tmp_path)
    task.start(pid=42)
    task.end(TaskStatus.FINISHED, exit_code=0)
    assert (task.status, task.pid, task.exit_code) == (TaskStatus.FINISHED, 42, 0)
    assert task.created_at <= task.started_at <= task.finished_at  # type: ignore[operator]


@pytest.mark.parametrize("end", [TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.KILLED])
def test_an_ended_task_cannot_move(end: TaskStatus, tmp_path: Path) -> None:
    task = _task(tmp_path)
    task.start(pid=1)
    task.end(end)
    with pytest.raises(InvalidTransition):
        task.start(pid=2)
    with pytest.raises(InvalidTransition):
        task.end(TaskStatus.FAILED)


def test_finished_needs_a_start_and_end_needs_an_end_state(tmp_path: Path) -> None:
    with pytest.raises(InvalidTransition):
        _task(tmp_path).end(TaskStatus.FINISHED)
    with pytest.raises(InvalidTransition):
        _task(tmp_path).end(TaskStatus.RUNNING)
    task = _task(tmp_path)
    task.end(TaskStatus.KILLED)  # killed before its process started
    assert task.status is TaskStatus.KILLED


async def test_output_decodes_across_chunks_and_replaces_bad_bytes(tmp_path: Path, writer: LogWriter) -> None:
    out = OutputLog(tmp_path / "out.log", writer)
    written: list[int] = []
    out.on_written = written.append
    euro = "€".encode()
    assert out.feed(b"a" + euro[:1]) == 1
    assert out.feed(euro[1:2]) == 0
    assert out.feed(euro[2:] + b"\xff\n") == len("€\ufffd\n".encode())
    assert out.feed(euro[:2]) == 0
    assert await out.close() == len("\ufffd".encode())
    expected = "a€\ufffd\n\ufffd"
    assert sum(written) == len(expected.encode())  # each byte said once, once in the file
    assert (await out.tail()) == (0, expected)
    assert (tmp_path / "out.log").read_text() == expected
    assert out.size == len(expected.encode())


async def test_output_keeps_a_bounded_tail_and_reads_the_rest_from_disk(
    tmp_path: Path, writer: LogWriter
) -> None:
    out = OutputLog(tmp_path / "out.log", writer, tail_limit=1000)
    lines = [f"line {i} é\n".encode() for i in range(5000)]
    for line in lines:
        out.feed(line)
        await out.drain()  # the writer keeps up: memory holds the tail only
    whole = b"".join(lines)
    assert out.size == len(whole)
    assert out.size - out.tail_start <= 2000  # memory holds the tail only
    assert await out.read(0, 100) == whole[:100]  # from the file
    assert await out.read(out.size - 10, 100) == whole[-10:]  # from memory
    offset, text = await out.tail(1000)
    assert text.encode() == whole[offset:]
    assert out.tail_lines(2) == ["line 4998 é", "line 4999 é"]
    assert out.has_newline_after(out.size - 3) and not out.has_newline_after(out.size)
    await out.close()
    assert (tmp_path / "out.log").read_bytes() == whole


async def test_a_short_output_stays_in_memory_after_its_end_and_a_long_one_goes(
    tmp_path: Path, writer: LogWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    short, long = OutputLog(tmp_path / "short.log", writer), OutputLog(tmp_path / "long.log", writer)
    short.feed(b"x" * (ENDED_KEEP - 5) + b"done\n")  # exactly as long as may stay
    long.feed(b"x" * (ENDED_KEEP + 1))
    await short.close()
    await long.close()
    assert (short.tail_start, long.tail_start) == (0, long.size)
    files: list[int] = []
    read_file = OutputLog._read_file

    def counted(self: OutputLog, offset: int, end: int) -> bytes:
        files.append(end - offset)
        return read_file(self, offset, end)

    monkeypatch.setattr(OutputLog, "_read_file", counted)
    assert await short.tail() == (0, "x" * (ENDED_KEEP - 5) + "done\n")
    assert files == []  # no file read in a thread
    assert (await long.tail(10))[1] == "x" * 10
    assert files == [10]


async def test_output_keeps_in_memory_what_the_file_does_not_hold_yet(tmp_path: Path) -> None:
    stalled = LogWriter()
    gate = threading.Event()
    stalled.submit(gate.wait)  # a disk that does not answer
    out = OutputLog(tmp_path / "out.log", stalled, tail_limit=100)
    data = b"".join(f"{i:04}\n".encode() for i in range(1000))
    for start in range(0, len(data), 50):
        out.feed(data[start : start + 50])
    assert out.backlog == len(data)
    # Nothing is shown before it is in the file: what a client saw survives a crash.
    assert (out.size, await out.read(0, len(data))) == (0, b"")
    assert not out.has_newline_after(0)
    gate.set()
    await out.drain()
    assert out.backlog == 0 and out.size == len(data)
    assert await out.read(0, len(data)) == data  # from memory: the tail was kept
    await out.close()
    assert (tmp_path / "out.log").read_bytes() == data
    stalled.close()


async def test_output_is_shown_once_in_the_file_before_the_loop_hears_of_it(
    tmp_path: Path, writer: LogWriter
) -> None:
    """A follower's answer holds what the file holds as it is made, even in a long turn of
    the loop (1,000 followers' answers): the writer's thread counts what it wrote."""
    out = OutputLog(tmp_path / "out.log", writer)
    told: list[int] = []
    out.on_written = told.append
    out.feed(b"line 1\n")
    await asyncio.sleep(0)  # the turn ends: the write goes to the thread
    # The loop held from here on, as by a long turn: no callback of the thread's runs.
    deadline = time.monotonic() + 10
    while out.size < 7 and time.monotonic() < deadline:
        time.sleep(0.001)  # noqa: ASYNC251 -- holding the loop is the point
    assert (out.size, out.backlog, await out.read(0, 100)) == (7, 0, b"line 1\n")
    assert (tmp_path / "out.log").read_bytes() == b"line 1\n"
    assert told == []  # its waiters are woken in the next turn
    await eventually(lambda: told == [7])
    await out.close()


async def test_a_task_s_json_shows_output_up_to_its_output_size(tmp_path: Path, writer: LogWriter) -> None:
    """The log grows in the writer's thread, even while the answer is made: `output` ends
    where `outputSize` says, so a client may follow from there."""
    out = OutputLog(tmp_path / "out.log", writer, tail_limit=4)
    out.feed(b"first line\n")
    await out.drain()
    task = Task(id=1, app="a", env="e", action="t", command=["pulsar"], output=out)
    task.start(pid=42)
    gate = threading.Event()
    writer.submit(gate.wait)  # the next write waits for it
    out.feed(b"line 2\n")  # memory keeps this one only: the first line is read from the file
    read_file = out._read_file

    def read_while_it_grows(offset: int, end: int) -> bytes:
        gate.set()  # the write lands while the answer reads its tail
        deadline = time.monotonic() + 10
        while out.size < 18 and time.monotonic() < deadline:
            time.sleep(0.001)
        return read_file(offset, end)

    out._read_file = read_while_it_grows  # type: ignore[method-assign]
    try:
        shown = await present.task_json(task)
    finally:
        gate.set()
    assert out.size == 18
    assert (shown["outputOffset"], shown["output"], shown["outputSize"]) == (0, "first line\n", 11)


async def test_a_failure_after_one_write_leaves_the_others_of_its_batch(
    writer: LogWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes of one turn are told together: what follows one of them (a task's waiters,
    another instance's feed) failing must not strand the others (another task's close)."""
    told: list[object] = []

    def fails(result: object, error: BaseException | None) -> None:
        raise RuntimeError("a bug in a follower's wake-up")

    writer.post(fails, lambda: "first")
    writer.post(lambda result, error: told.append(result), lambda: "second")
    closed = writer.submit(lambda: "third")
    assert await asyncio.wait_for(closed, 10) == "third"
    assert told == ["second"]
    assert "a bug in a follower's wake-up" in caplog.text


@pytest.mark.parametrize("fails", [False, True])
async def test_a_thread_s_outcome_comes_back_in_the_next_turn_of_the_loop(
    fails: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a turn of the loop is long (a thousand followers' answers): what a thread
    did is told in the turn after it handed it back, not two turns later as through a
    future (the copy into an asyncio future, then its callbacks)."""
    loop = asyncio.get_running_loop()
    handed = threading.Event()
    hand_back = loop.call_soon_threadsafe

    def handing_back(callback: Callable[..., object], *args: object) -> asyncio.Handle:
        handle = hand_back(callback, *args)
        handed.set()
        return handle

    monkeypatch.setattr(loop, "call_soon_threadsafe", handing_back)
    told: list[tuple[object, BaseException | None]] = []

    def job() -> str:
        if fails:
            raise OSError("disk full")
        return "done"

    def then(result: object, error: BaseException | None) -> None:
        assert threading.current_thread() is threading.main_thread()
        told.append((result, error))

    with ThreadPoolExecutor(max_workers=1) as pool:
        run_then(pool, job, then)
        # This turn is held until the thread has handed the outcome back: a callback asked
        # for now runs in the next turn, after what the thread asked for.
        assert handed.wait(10)
        next_turn: asyncio.Future[list[tuple[object, BaseException | None]]] = loop.create_future()
        loop.call_soon(lambda: next_turn.set_result(list(told)))
        by_then = await asyncio.wait_for(next_turn, 10)
    assert len(by_then) == 1, "not told in the next turn"
    result, error = by_then[0]
    assert result == (None if fails else "done")
    assert isinstance(error, OSError) if fails else error is None


async def test_a_log_closes_even_when_what_follows_its_last_write_fails(
    tmp_path: Path, writer: LogWriter
) -> None:
    """The task's end waits for the log's close: a listener of its writes that fails must
    not leave it waiting for ever."""
    out = OutputLog(tmp_path / "out.log", writer)

    def failing(count: int) -> None:
        raise RuntimeError("a listener's bug")

    out.on_written = failing
    out.feed(b"line\n")
    await asyncio.wait_for(out.close(), 10)
    assert (tmp_path / "out.log").read_bytes() == b"line\n"


async def test_work_asked_for_while_a_batch_is_out_goes_as_the_next_one() -> None:
    """One batch at a time (a thread's): what several turns ask for while the thread works
    goes together when it is done; a read's flush does not wait for it."""
    handed: list[list[int]] = []
    batch: TurnBatch[int] = TurnBatch(handed.append, one_at_a_time=True)
    batch.add(1)
    batch.add(2)
    await asyncio.sleep(0)  # the turn ends: the first batch goes
    assert handed == [[1, 2]]
    for item in (3, 4, 5):  # three turns while the thread works
        batch.add(item)
        await asyncio.sleep(0)
    assert handed == [[1, 2]]
    batch.done()
    assert handed == [[1, 2], [3, 4, 5]]
    batch.add(6)
    batch.flush(now=True)  # a read must see it, batch out or not
    assert handed == [[1, 2], [3, 4, 5], [6]]
    batch.done()
    batch.done()  # nothing pending: nothing handed over
    assert handed == [[1, 2], [3, 4, 5], [6]]
    unbounded: TurnBatch[int] = TurnBatch(handed.append)  # a turn's work, each turn (PostgreSQL)
    unbounded.add(7)
    await asyncio.sleep(0)
    unbounded.add(8)
    await asyncio.sleep(0)
    assert handed[-2:] == [[7], [8]]


@pytest.mark.parametrize("text", ["a", "é", "€", "😀", "aé€😀"])
def test_complete_chars_never_cuts_a_character(text: str) -> None:
    data = text.encode()
    for end in range(len(data) + 1):
        kept = complete_chars(data[:end])
        kept.decode()  # whole characters only
        assert data[:end].startswith(kept) and end - len(kept) < 4


async def test_bus_numbers_events_and_routes_topics() -> None:
    bus = EventBus()
    created = asyncio.create_task(bus.wait(created_topic(), 5))
    output = asyncio.create_task(bus.wait(task_topic(7), 5))
    state = asyncio.create_task(bus.wait(state_topic(7), 5))
    await eventually(lambda: bus.waiter_count == 3)
    first = bus.publish(EventKind.OUTPUT, 7)
    assert (await output) == first
    assert not state.done() and not created.done()
    # Output takes no number: it carries the current one (output is read by byte offset).
    assert first.seq == bus.seq == 0 and bus.published == 1
    second = bus.publish(EventKind.CHANGED, 7)
    assert (await state) == second and second.seq == first.seq + 1
    third = bus.publish(EventKind.CREATED, 8)
    assert (await created) == third and third.seq == second.seq + 1
    assert bus.waiter_count == 0 and bus.seq == 2 and bus.published == 3


def test_bus_refuses_a_cursor_from_before_a_restart() -> None:
    """Each run numbers its events from its own base (run << 32): a cursor of an earlier run
    is older than anything kept, never taken for one of this run."""
    bus = EventBus(last_seq=2 << 32)
    for old in (5, 1 << 32, (2 << 32) - 1):
        with pytest.raises(CursorGone, match="older"):
            bus.since(old)
    assert bus.since(2 << 32) == []
    output = bus.publish(EventKind.OUTPUT, 1)
    assert output.seq == bus.seq == 2 << 32 and bus.published == 1  # output takes no number
    assert bus.since(2 << 32) == []  # nor is it kept for cursors
    created = bus.publish(EventKind.CREATED, 1, "created")
    assert created.seq == bus.seq == (2 << 32) + 1 and bus.published == 2
    assert bus.since(2 << 32) == [created]
    with pytest.raises(CursorGone, match="older"):
        bus.since(1 << 32)
    with pytest.raises(CursorGone, match="ahead"):
        bus.since((2 << 32) + 2)


async def test_bus_timeout_cancel_and_close_leave_no_waiter() -> None:
    bus = EventBus()
    assert await bus.wait("x", 0.01) is None
    waiting = asyncio.create_task(bus.wait("x", 5))
    await eventually(lambda: bus.waiter_count == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bus.waiter_count == 0
    waiting = asyncio.create_task(bus.wait("x", 5))
    await eventually(lambda: bus.waiter_count == 1)
    bus.close()
    assert await waiting is None
    assert await bus.wait("x", 5) is None  # closed: answers at once
    assert bus.waiter_count == 0


@pytest.mark.parametrize("name", ["shop", "my-app_2", "a.b", "A1"])
def test_good_names(name: str) -> None:
    assert check_name("app", name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a..b", ".x", "-x", "a/b", "a b", "a\nb", "é", "x" * 101])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        check_name("app", name)


@pytest.mark.parametrize(
    "action", ["deploy", "deploy:check", "db:migrate[1,2]", "task[a=b,c/d]", "x[]", "run_1.2"]
)
def test_good_actions(action: str) -> None:
    assert check_action(action) == action


@pytest.mark.parametrize(
    "action",
    ["", "-h", "--help", "a;b", "a b", "a|b", "$(id)", "`id`", "a[b]c", "a[b", "a[$x]", "a[~]", "a'b"],
)
def test_bad_actions(action: str) -> None:
    with pytest.raises(InvalidName):
        check_action(action)


@pytest.mark.parametrize(
    ("lines", "failed"),
    [
        (["Executed task deploy for a on e!"], False),
        (["Deployed a on e!"], False),
        (["Failed to execute task deploy for a on e.", "SSHKit::Error"], True),
        (["Failed to deploy a on e.", "error line"], True),
        (["\x1b[31mFailed to deploy a on e.\x1b[0m"], True),
        (["Failed to deploy a on e.", "retrying", "Deployed a on e!"], False),
        (["no verdict at all"], False),
    ],
)
def test_pulsar_verdict(lines: list[str], failed: bool) -> None:
    assert pulsar.reported_failure(lines) is failed


def test_command_and_redaction() -> None:
    assert pulsar.command("pulsar", "a", "e", "t", None) == ["pulsar", "task", "a", "e", "t"]
    assert pulsar.command("p", "a", "e", "t", "r")[-2:] == ["--conf-repo", "r"]
    assert pulsar.redact("https://u:tok@github.com/o/r.git") == "https://u:***@github.com/o/r.git"
    assert pulsar.redact("https://tok@github.com/o/r.git") == "https://***@github.com/o/r.git"
    for kept in ("git@github.com:o/r.git", "ssh://git@host/r", "/srv/conf", "user/repo"):
        assert pulsar.redact(kept) == kept


async def test_output_fast_path_keeps_valid_utf8_and_replaces_the_rest(
    tmp_path: Path, writer: LogWriter
) -> None:
    out = OutputLog(tmp_path / "out.log", writer)
    out.feed("été ".encode() + "€".encode()[:1])  # valid, then a character cut by the read
    out.feed("€".encode()[1:] + b" ok \xff x\n")  # its end, then a byte that is not UTF-8
    out.feed(b"\xe2\x82")  # cut again, and never finished
    await out.close()
    assert (tmp_path / "out.log").read_text() == "été € ok \ufffd x\n\ufffd"
