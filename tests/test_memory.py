"""Memory given back once a burst is over: one trim after the last ask, not one an ask."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from pulsar_rest import memory
from tests.conftest import eventually


async def test_a_burst_of_asks_makes_one_trim_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    done = threading.Event()
    real = memory._MALLOC_TRIM

    def malloc_trim(pad: int) -> int:
        trims.append(pad)
        done.set()
        return real(pad) if real is not None else 0

    monkeypatch.setattr(memory, "_MALLOC_TRIM", malloc_trim)
    trim = memory.Trim(delay=0.05)
    loop = asyncio.get_running_loop()
    timers = 0
    call_later = loop.call_later

    def counted(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += callback == trim._run  # (asyncio.sleep sets timers too)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", counted)
    first = loop.time()
    for _ in range(5):  # asks spread over more than the delay: still one trim, after the last
        trim.soon()
        await asyncio.sleep(0.02)  # the asks' pace, not a synchronisation
    last = first + 0.08  # the last ask came no earlier than this
    burst = loop.time() - first
    # A timer set again only when it fires (once a delay at most), not at each of 5 asks.
    assert 1 <= timers <= 1 + burst / 0.05
    await eventually(done.is_set, what="the trim")
    assert trims == [0] and trim._timer is None
    assert loop.time() - last >= 0.05 and loop.time() - first > 0.1


# In a process of its own: the arenas are the process's, and pytest's threads have theirs.
_ARENAS = """
import ctypes, sys, tempfile, threading
from pulsar_rest import memory
if sys.argv[1] == "one":
    memory.one_arena()
thread = threading.Thread(target=lambda: bytearray(100 * 1024))  # below the mmap threshold
thread.start()
thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
with tempfile.NamedTemporaryFile() as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(out.read().count(b"<heap nr="))
"""


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="glibc's allocator only")
@pytest.mark.parametrize(("mode", "heaps"), [("one", 1), ("default", 2)])
def test_threads_allocate_from_the_main_arena_which_a_trim_returns_whole(mode: str, heaps: int) -> None:
    # A thread's own arena keeps the top of its heap through malloc_trim(): after 200
    # followers of a fast task had gone, six threads kept about 4 MiB each.
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, check=True, env=env
    )
    assert int(out.stdout) == heaps
