"""Work the event loop hands over at the end of a turn, and work it hands to a thread.

Under load a turn of the loop lasts long (a thousand followers' answers are one turn), so
what goes back and forth between the loop and a thread is counted in turns, not in calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
W = TypeVar("W")


class TurnBatch(Generic[W]):
    """The work asked for in one turn of the event loop, handed over together at its end
    (or before a read, which must see it): a burst of tasks costs one transaction of the
    database, or one wake-up of the log's thread, not one each.

    For a thread (`one_at_a_time`), one batch at a time: what is asked for while the thread
    works on a batch waits, and goes as the next one when done() is called, whatever the
    turns in between. Under load, turns are shorter than the thread's work, and every batch
    costs hand-overs of the GIL between the loop and the thread: at 20 short tasks in flight,
    the server spent 0.2-0.3 ms of CPU a task less this way (see the README's scenario 5)."""

    def __init__(self, write: Callable[[list[W]], None], one_at_a_time: bool = False) -> None:
        self._write = write
        self._pending: list[W] = []
        self._one_at_a_time = one_at_a_time
        self._out = 0  # batches with the thread (more than one after a read's flush)

    def add(self, item: W) -> None:
        if not self._pending and not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(item)

    def flush(self, now: bool = False) -> None:
        """Hand over what is pending (`now`: even with a batch out, as a read must)."""
        if self._out and not now:
            return  # it goes at done()
        batch, self._pending = self._pending, []
        if batch:
            if self._one_at_a_time:
                self._out += 1
            try:
                self._write(batch)
            except BaseException:
                self.done()  # never handed over: nothing will say it is done
                raise

    def done(self) -> None:
        """A batch handed over is done (one at a time): once none is out, the next goes."""
        self._out = max(0, self._out - 1)
        if not self._out:
            self.flush()


Then = Callable[[T | None, BaseException | None], None]  # told `fn`'s result or error


def run_then(pool: Executor, fn: Callable[[], T], then: Then[T]) -> None:
    """Run `fn()` in `pool`, then `then(result, error)` on the running loop, one turn after
    `fn` returned. Through a future it takes three (the copy into an asyncio future, its
    callback, the futures that callback resolves): a write of output reached its followers
    about 30 % later with 1,000 of them."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None  # the loop has ended (a close after it): the work is done all the same

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (fn(), None)
        except Exception as exc:  # it goes to `then`
            outcome = (None, exc)
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
                loop.call_soon_threadsafe(then, *outcome)

    pool.submit(run)


def settle(done: asyncio.Future[T], result: T, error: BaseException | None) -> None:
    """Give `done` the outcome a thread told, unless its caller has given up on it."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
