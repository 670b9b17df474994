"""The machine pulsar-rest runs on, from psutil: what an operator looks at when deploys are
slow (the host-statistics sibling's figures)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from pulsar_rest.runner import CPU_SAMPLE


def statistics(data_dir: Path) -> dict[str, Any]:
    """Blocking (it measures CPU use for CPU_SAMPLE seconds): run it in a thread."""
    per_core = psutil.cpu_percent(interval=CPU_SAMPLE, percpu=True)
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    disk = psutil.disk_usage(str(data_dir))
    me = psutil.Process()
    with me.oneshot():
        rss = me.memory_info().rss
        open_files = me.num_fds()
        threads = me.num_threads()
    return {
        "cpu": {
            "percent": round(sum(per_core) / len(per_core), 1),
            "perCore": per_core,
            "count": len(per_core),
        },
        "load": dict(zip(("1m", "5m", "15m"), os.getloadavg(), strict=True)),
        "memory": {
            "total": memory.total,
            "available": memory.available,
            "used": memory.used,
            "percent": memory.percent,
        },
        "swap": {"total": swap.total, "used": swap.used, "percent": swap.percent},
        "disk": {
            "path": str(data_dir),
            "total": disk.total,
            "used": disk.used,
            "free": disk.free,
            "percent": disk.percent,
        },
        "uptime": round(time.time() - psutil.boot_time()),
        "process": {"pid": me.pid, "rss": rss, "openFiles": open_files, "threads": threads},
    }
