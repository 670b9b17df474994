"""Many followers of one task: what they are sent is made once, and they are woken together.

Followers of a running task (`/task/:id/stream`, `/task/:id/output?offset=`) are woken by
each piece of output the task writes. Woken for every piece and each making its own answer,
200 followers of a task writing 1 MB/s spent the event loop's time encoding the same bytes
200 times, read the task's pipe late, and so slowed the deploy itself. Instead, a follower
woken by output waits for the next tick of a shared clock (every TICK seconds): followers
woken by the same output wake in the same turn of the loop, at the same offset, and the
message for that range is encoded once (a small cache of recent messages) and written to
each. A follower that lags behind reads its own ranges, in large pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Generic, TypeVar

from pulsar_rest.memory import Trim

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


class Messages(Generic[V]):
    """Encoded messages by what they hold (task, range, state): made by the first follower
    that needs one, reused by the others, the oldest forgotten first."""

    def __init__(self, made: Budget, sent: Budget, kept: int = KEPT) -> None:
        self.made, self.sent = made, sent
        self._kept = kept
        self._made: OrderedDict[Key, V] = OrderedDict()
        self._making: dict[Key, asyncio.Future[V | None]] = {}
        self._followers: Counter[Hashable] = Counter()
        self._trim = Trim()

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

    @contextlib.contextmanager
    def following(self, task_id: int) -> Iterator[None]:
        """While a follower of the task is here; once the last has gone, its messages go."""
        self._followers[task_id] += 1
        try:
            yield
        finally:
            self._followers[task_id] -= 1
            if not self._followers[task_id]:
                del self._followers[task_id]
                gone = [key for key in self._made if key[0] == task_id]
                for key in gone:
                    del self._made[key]
                if gone:
                    self._trim.soon()  # what they were sent was held in big buffers
