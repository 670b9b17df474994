"""Many followers of one task: what they are sent is made once, and they are woken together.

Followers of a running task (`/task/:id/stream`, `/task/:id/output?offset=`) are woken by
each piece of output the task writes. Woken for every piece and each making its own answer,
200 followers of a task writing 1 MB/s spent the event loop's time encoding the same bytes
200 times, read the task's pipe late, and so slowed the deploy itself. Instead, a stream's
follower woken by output waits for the next tick of a shared clock (every TICK seconds):
followers woken by the same output wake in the same turn of the loop, at the same offset,
and the message for that range is encoded once (a small cache of recent messages) and
written to each. A follower that lags behind reads its own ranges, in large pieces.
Long-poll followers ask from scattered offsets: what their answers share is the output,
escaped once for all of them (JsonText).
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from json.encoder import encode_basestring_ascii
from typing import Any, Generic, TypeVar

from pulsar_rest.memory import DELAY, Trim
from pulsar_rest.output import complete_chars

# The fan-out clock: the most a follower's message is held back to be shared (the lag it
# adds), and the fewest messages a second a follower gets while output flows.
TICK = 0.04
# Bytes of output made into messages (read and encoded), and bytes of messages sent, each
# tick, for all followers together: however many follow or lag, they cost a bounded share
# of the event loop, and the tasks' pipes are read (a deploy never waits for its audience).
# About 100 MB/s made and 400 MB/s sent; beyond that, followers fall behind.
MADE = 4 * 1024 * 1024
SENT = 16 * 1024 * 1024
# Messages kept for followers that come for the same range: a few ticks of every task
# followed at once (each at most a stream's or an answer's chunk, up to 1 MiB). A task's go
# when its last follower leaves: what was sent to followers that have gone is not held.
KEPT = 64

V = TypeVar("V")


async def tick() -> None:
    """Wait for the next tick of the clock shared by every follower."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(TICK - loop.time() % TICK)  # a shared clock's beat, not a synchronisation


class Budget:
    """What followers may make (or send) per tick: a follower that needs more waits for the
    next tick once this one's is spent."""

    def __init__(self, per_tick: int) -> None:
        self._per_tick = per_tick
        self._tick = -1
        self._left = 0

    async def spend(self, amount: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = int(loop.time() // TICK)
            if now != self._tick:
                self._tick, self._left = now, self._per_tick
            if self._left > 0:
                self._left -= amount
                return
            await tick()


# A message's key: what it holds, the id of its task first.
Key = tuple[Hashable, ...]


class JsonText:
    """A task's output as the text of a JSON string, escaped once for all its followers.

    Long-poll followers ask from scattered offsets (each from where its last answer ended),
    so their answers are rarely the same message; but they all reach the same end, and
    escaping each answer's output was a fifth of the server's time with 1,000 of them. The
    text is kept in pieces cut where answers started and ended: a follower's answer starts
    where one ended, so it is a join of pieces, and only output no answer held yet is
    escaped. The log never changes what it holds, so a piece stays right."""

    def __init__(self, keep: int) -> None:
        self._keep = keep  # raw bytes kept behind the frontier (followers further behind escape their own)
        self._starts: list[int] = []  # the raw offset where each piece starts
        self._pieces: list[bytes] = []
        self._index: dict[int, int] = {}  # offset -> its piece (or len(_pieces): the frontier)
        self._frontier = -1

    def escaped(self, offset: int, data: bytes) -> bytes:
        """`data`, the log's bytes from `offset`, decoded and escaped as json.dumps does
        (without the quotes). Both ends must be where characters start, as answers' are."""
        end = offset + len(data)
        if self._frontier < 0 or offset > self._frontier:
            self._restart(offset)
        if end > self._frontier and len(complete_chars(data)) == len(data):
            # (A piece ends where a character does: joined to the next, it stays whole.)
            self._add(data[self._frontier - offset :])
        first, last = self._index.get(offset), self._index.get(end)
        if first is None or last is None:
            # From an offset no answer started or ended at (or gone: far behind), or to an
            # end inside a piece (a smaller limit than the others').
            return _escape(data)
        return b"".join(self._pieces[first:last])

    def cost(self, offset: int, end: int) -> int:
        """How many bytes an answer from `offset` to about `end` would escape: what is new
        if it reaches the frontier from a piece's start, else all of it (its end, cut at a
        line, is then rarely a piece's)."""
        if offset in self._index and end >= self._frontier:
            return end - self._frontier
        return end - offset

    def _restart(self, offset: int) -> None:
        self._starts, self._pieces, self._index = [], [], {offset: 0}
        self._frontier = offset

    def _add(self, data: bytes) -> None:
        self._starts.append(self._frontier)
        self._pieces.append(_escape(data))
        self._frontier += len(data)
        self._index[self._frontier] = len(self._pieces)
        if self._frontier - self._starts[0] > 2 * self._keep:
            # The older half goes: one copy per `keep` bytes, not one per piece.
            near = (i for i, start in enumerate(self._starts) if self._frontier - start <= self._keep)
            drop = next(near, len(self._starts) - 1)
            self._starts, self._pieces = self._starts[drop:], self._pieces[drop:]
            self._index = {start: i for i, start in enumerate(self._starts)}
            self._index[self._frontier] = len(self._pieces)


def _escape(data: bytes) -> bytes:
    return encode_basestring_ascii(data.decode(errors="replace"))[1:-1].encode()


class Messages(Generic[V]):
    """Encoded messages by what they hold (task, range, state): made by the first follower
    that needs one, reused by the others, the oldest forgotten first."""

    def __init__(self, made: Budget, sent: Budget, kept: int = KEPT) -> None:
        self.made, self.sent = made, sent
        self._kept = kept
        self._made: OrderedDict[Key, V] = OrderedDict()
        self._making: dict[Key, asyncio.Future[V | None]] = {}
        self._followers: Counter[Hashable] = Counter()
        self._texts: dict[Hashable, JsonText] = {}
        self._lasts: dict[Hashable, tuple[Key, bytes]] = {}
        # A long-poll follower is here only while it asks: its task's messages and text stay
        # for its next ask, and go DELAY after the task's last follower left (when it did,
        # by task: a busy task's followers never put off another's).
        self._unfollowed: dict[Hashable, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._trim = Trim()

    def text(self, task_id: Hashable, keep: int) -> JsonText:
        """The escaped output of a task that is followed (see following)."""
        text = self._texts.get(task_id)
        if text is None:
            text = self._texts[task_id] = JsonText(keep)
        return text

    def last(self, key: Key, make: Callable[[], bytes]) -> bytes:
        """A part of messages that is the same for every follower of the task as it is
        now (`key`, its id first): made again only once the task has changed."""
        found = self._lasts.get(key[0])
        if found is None or found[0] != key:
            found = self._lasts[key[0]] = (key, make())
        return found[1]

    async def made_once(self, key: Key, make: Callable[[], Awaitable[tuple[V, bool]]]) -> V:
        """The message for `key`: kept, or being made for another follower (awaited), or
        made now by `make`, which says whether it may be kept for those who come after.
        Followers woken together ask for the same message at once: it is made once."""
        while True:
            found = self._made.get(key)
            if found is not None:
                return found
            making = self._making.get(key)
            if making is None:
                break
            made = await asyncio.shield(making)
            if made is not None:
                return made
            # Its maker went away (its client left): look again, and make it if no one does.
        making = self._making[key] = asyncio.get_running_loop().create_future()
        try:
            message, keep = await make()
        except BaseException:
            making.set_result(None)  # not made: whoever waited makes their own
            raise
        finally:
            del self._making[key]
        making.set_result(message)
        if keep:
            self._made[key] = message
            if len(self._made) > self._kept:
                self._made.popitem(last=False)
        return message

    def following(self, task_id: int) -> _Following:
        """While a follower of the task is here; once the last has gone (for a quarter of
        a second: a long-poll follower comes back), its messages and text go."""
        return _Following(self, task_id)

    def _arrived(self, task_id: int) -> None:
        self._followers[task_id] += 1

    def _left(self, task_id: int) -> None:
        self._followers[task_id] -= 1
        if not self._followers[task_id]:
            del self._followers[task_id]
            loop = asyncio.get_running_loop()
            self._unfollowed[task_id] = loop.time()
            if self._sweep is None:
                self._sweep = loop.call_later(DELAY, self._forget_unfollowed, loop)

    def _forget_unfollowed(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = loop.time()
        left = []
        for task_id, at in list(self._unfollowed.items()):
            if task_id in self._followers:
                del self._unfollowed[task_id]  # followed again
            elif now - at >= DELAY:
                del self._unfollowed[task_id]
                left.append(task_id)
        if self._unfollowed:
            first = min(self._unfollowed.values())
            self._sweep = loop.call_later(first + DELAY - now, self._forget_unfollowed, loop)
        gone = [key for key in self._made if key[0] in left]
        for key in gone:
            del self._made[key]
        for task_id in left:
            self._texts.pop(task_id, None)
            self._lasts.pop(task_id, None)
        if gone:
            self._trim.soon()  # what they were sent was held in big buffers


class _Following:
    # A class, not a generator made a context manager: a follower's every ask goes through it.
    __slots__ = ("_messages", "_task_id")

    def __init__(self, messages: Messages[Any], task_id: int) -> None:
        self._messages, self._task_id = messages, task_id

    def __enter__(self) -> None:
        self._messages._arrived(self._task_id)

    def __exit__(self, *exc: object) -> None:
        self._messages._left(self._task_id)
