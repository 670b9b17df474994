"""Memory given back once a burst is over: one trim after the last ask, not one an ask."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pulsar_rest import memory
from tests.conftest import eventually


async def test_a_burst_of_asks_makes_one_trim_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    done = threading.Event()

    def malloc_trim(pad: int) -> int:
        trims.append(pad)
        done.set()
        return 1

    monkeypatch.setattr(memory, "_MALLOC_TRIM", malloc_trim)
    trim = memory.Trim(delay=0.05)
    loop = asyncio.get_running_loop()
    first = loop.time()
    for _ in range(5):  # asks spread over more than the delay: still one trim, after the last
        trim.soon()
        await asyncio.sleep(0.02)  # the asks' pace, not a synchronisation
    last = loop.time() - 0.02
    await eventually(done.is_set, what="the trim")
    assert trims == [0]
    assert loop.time() - last >= 0.05 and loop.time() - first > 0.1
