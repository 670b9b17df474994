"""Memory given back to the system once a burst is over.

Python frees the large buffers of a burst (the messages of many followers) to the C
allocator, and glibc's keeps most of them in its heaps: the server's RSS would stay near
its peak. malloc_trim() returns the free pages. (A fixed, low mmap threshold would return
each large buffer as it is freed, but every 1 MiB read of a task's pipe then costs fresh
pages: 200 followers of a task writing 10 MB/s slowed it to half its rate.)

malloc_trim() cannot return the top of a thread's own heap (glibc gives each thread that
allocates an arena of its own, up to 8 per core): the reads of logs in the default
executor's threads left about 4 MiB in each of six of them after 200 followers of a task
writing 10 MB/s had gone. The server's threads share the main arena instead (one_arena):
they allocate little while holding the GIL, so they rarely contend for its lock.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

# How long after the last call of Trim.soon() the trim runs: followers leave together, and
# their connections' buffers are freed a moment after.
DELAY = 0.25


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


_LIBC = _libc()
_MALLOC_TRIM: Callable[[int], int] | None = getattr(_LIBC, "malloc_trim", None)  # not in musl
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_arena() -> None:
    """Every thread started from now on allocates from the main arena, which
    malloc_trim() returns whole (glibc only; elsewhere nothing changes)."""
    if _LIBC is not None and _MALLOC_TRIM is not None:  # glibc
        _LIBC.mallopt(_M_ARENA_MAX, 1)


class Trim:
    """A trim of the C allocator's heaps, DELAY after the last time one was asked for."""

    def __init__(self, delay: float = DELAY) -> None:
        self._delay = delay
        self._asked = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        # Called as each long-poll ends: a time noted, and a timer only if none is set.
        if _MALLOC_TRIM is None:
            return
        loop = asyncio.get_running_loop()
        self._asked = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self._delay, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        quiet = loop.time() - self._asked
        if quiet < self._delay:  # asked again meanwhile: not over yet
            self._timer = loop.call_later(self._delay - quiet, self._run, loop)
            return
        self._timer = None
        if _MALLOC_TRIM is not None:
            # In a thread: a trim walks the heaps, and the call releases the GIL meanwhile.
            loop.run_in_executor(None, _MALLOC_TRIM, 0)
