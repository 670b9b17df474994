"""The application factory: every resource opened and closed in a cleanup context."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from pulsar_rest.events import EventBus
from pulsar_rest.service import RunConfig, TaskService
from pulsar_rest.settings import Settings
from pulsar_rest.store import MemoryStore
from pulsar_rest.web.errors import error_middleware
from pulsar_rest.web.keys import ANSWERS, BUS, SERVICE, SETTINGS
from pulsar_rest.web.present import AnswerCache
from pulsar_rest.web.routes import setup_routes

# Larger bodies are refused with 413: a create request is a few names.
MAX_BODY = 64 * 1024


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    setup_routes(app)
    app.cleanup_ctx.append(_tasks)
    app.on_shutdown.append(_answer_waiters)
    return app


async def _tasks(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bus = EventBus()
    config = RunConfig(
        pulsar_bin=settings.pulsar_bin,
        conf_repo=settings.config_repo,
        kill_grace=settings.kill_grace,
    )
    service = TaskService(MemoryStore(logs), bus, config)
    app[ANSWERS] = AnswerCache()
    app[BUS] = bus
    app[SERVICE] = service
    yield
    await service.close()


async def _answer_waiters(app: web.Application) -> None:
    # Long-polls answer `changed: false` now instead of holding the shutdown for 30 s.
    app[BUS].close()
