"""Is this instance fit to serve? The data directory takes writes, the database answers,
the configuration repository could be fetched last time, and the server is not stopping.
Cheap enough for a load balancer's every few seconds: no git fetch, no scan."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from pulsar_rest.confrepo import ConfigRepo
from pulsar_rest.service import TaskService
from pulsar_rest.store import TaskStore

# Longest wait for the disk or the database: a hung one is a failed check, not a hung probe.
TIMEOUT = 2.0
PROBE = ".health"


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str = ""  # why not, in a few words (the check is open to all: no paths, no errors)


async def checks(
    data_dir: Path, store: TaskStore, service: TaskService, conf: ConfigRepo | None
) -> dict[str, Check]:
    found = {
        "dataDir": await _bounded(asyncio.to_thread(_writable, data_dir), "not writable"),
        "database": await _bounded(store.ping(), "no answer"),
        "accepting": Check(True) if service.accepting else Check(False, "stopping"),
    }
    if conf is not None and conf.plain_dir is None:
        found["configRepo"] = (
            Check(True) if conf.last_error is None else Check(False, "the last fetch failed")
        )
    return found


async def _bounded(check: Awaitable[object], failure: str) -> Check:
    try:
        async with asyncio.timeout(TIMEOUT):
            await check
    except Exception:  # any failure of the probe is the check's failure
        return Check(False, failure)
    return Check(True)


def _writable(data_dir: Path) -> None:
    """Raise unless a file can be made in the data directory: access() alone says yes to
    root on a directory without write permission, and nothing of a read-only file system
    mounted later."""
    if not os.access(data_dir, os.W_OK):
        raise PermissionError(data_dir)
    probe = data_dir / PROBE
    probe.write_bytes(b"ok")
    probe.unlink()
