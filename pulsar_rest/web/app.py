"""The application factory: every resource opened and closed in a cleanup context."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator

import aiohttp
import aiohttp_session
from aiohttp import web

from pulsar_rest.audit import Audit
from pulsar_rest.auth.github import GitHubClient
from pulsar_rest.auth.identity import Authenticator
from pulsar_rest.confrepo import ConfigRepo, RepoUnavailable
from pulsar_rest.events import EventBus
from pulsar_rest.metrics import Live, Metrics
from pulsar_rest.pgfeed import PgFeed
from pulsar_rest.pgstore import PgStore, shown_dsn
from pulsar_rest.service import RunConfig, TaskService
from pulsar_rest.settings import Settings
from pulsar_rest.store import SqliteStore, TaskStore
from pulsar_rest.web import fanout
from pulsar_rest.web.auth import Gatekeeper, auth_middleware
from pulsar_rest.web.console import on_prepare
from pulsar_rest.web.errors import error_middleware
from pulsar_rest.web.fanout import Budget, Messages
from pulsar_rest.web.keys import (
    ANSWERS,
    AUDIT,
    BUS,
    CONF,
    GATEKEEPER,
    METRICS,
    OUTPUT_ANSWERS,
    SERVICE,
    SETTINGS,
    SIGN_IN,
    STORE,
    STREAM_MESSAGES,
)
from pulsar_rest.web.monitoring import metrics_middleware
from pulsar_rest.web.present import AnswerCache
from pulsar_rest.web.routes import setup_routes
from pulsar_rest.web.signin import SignIn, session_keys

log = logging.getLogger(__name__)

# Larger bodies are refused with 413: a create request is a few names.
MAX_BODY = 64 * 1024
# Each start of the server numbers its events from a range of its own (run << RUN_BITS), so
# a cursor from before a restart or a crash can never be taken for a cursor of this run.
RUN_BITS = 32


def create_app(settings: Settings) -> web.Application:
    """The application; SignInSetupError if browser sign-in is configured and its session
    keys cannot be had."""
    sessions = []
    sign_in = None
    if settings.browser_sign_in:
        sign_in = SignIn(settings, session_keys(settings))
        sessions = [aiohttp_session.session_middleware(sign_in.storage)]
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, *sessions, auth_middleware],
        client_max_size=MAX_BODY,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    if sign_in is not None:
        app[SIGN_IN] = sign_in
    setup_routes(app)
    app.on_response_prepare.append(on_prepare)
    app.cleanup_ctx.append(_tasks)
    app.cleanup_ctx.append(_auth)
    app.on_shutdown.append(_answer_waiters)
    return app


async def _tasks(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pulsar_bin = shutil.which(settings.pulsar_bin)
    if pulsar_bin is None:
        log.info("no %s executable: tasks run on pulsar-rest's own runner (cap)", settings.pulsar_bin)
        if shutil.which("cap") is None:
            log.warning("cap is not on the PATH: every task will fail (Debian: apt-get install capistrano)")
    conf = None
    if settings.config_repo:
        conf = ConfigRepo(
            settings.config_repo,
            settings.config_branch,
            settings.data_dir / "conf",
            settings.config_fetch_interval,
        )
        if conf.plain_dir is not None and settings.config_branch != "master":
            raise RepoUnavailable(
                f"--config-repo {conf.plain_dir} is a directory, not a git repository: "
                f"--config-branch {settings.config_branch} cannot apply"
            )
        tree, commit = await conf.current()  # unreachable: a start-up error, not a later 503
        if commit is None:
            log.info("configuration repository %s: a plain directory (no git)", tree)
        else:
            log.info("configuration repository %s at commit %s", conf.shown_url, commit)
    # With PostgreSQL, the output still lives in --data-dir.
    pg = None if settings.database is None else PgStore(settings.database, settings.data_dir)
    store: TaskStore = SqliteStore(settings.data_dir) if pg is None else pg
    history = await store.open()
    if pg is not None:
        log.info("history in PostgreSQL at %s, this instance %s", shown_dsn(pg.dsn), pg.instance)
    if history.seq is None:
        bus = EventBus(last_seq=history.run << RUN_BITS)
    else:  # numbered by the database: the same cursors on every instance, across restarts
        bus = EventBus(last_seq=history.seq, recent=history.recent, horizon=history.horizon)
    config = RunConfig(
        pulsar_bin=None if pulsar_bin is None else settings.pulsar_bin,
        conf=conf,
        kill_grace=settings.kill_grace,
        retain_tasks=settings.retain_tasks,
        retain_days=settings.retain_days,
        max_running=settings.max_running,
        # Only pulsar-rest's own runner has a run directory to remove at each task's end.
        run_root=settings.data_dir / "runs" if pulsar_bin is None else None,
    )
    service = TaskService(store, bus, config, history.live, history.ended, history.others)
    feed = None
    if pg is not None:
        feed = PgFeed(pg, bus, service.apply, service.kill_requested, service.output_grew, service.remote_ids)
        service.share(feed)
    app[STORE] = store
    app[CONF] = conf
    app[AUDIT] = Audit(store)
    service.on_end.append(app[METRICS].task_ended)
    app[ANSWERS] = AnswerCache()
    made, sent = Budget(fanout.MADE), Budget(fanout.SENT)  # for both kinds of followers
    app[STREAM_MESSAGES] = Messages(made, sent)
    app[OUTPUT_ANSWERS] = Messages(made, sent)
    app[BUS] = bus
    app[SERVICE] = service
    await service.start()
    if feed is not None:
        feed.start()
    yield
    if feed is not None:
        await feed.close()
    await service.close()


async def _auth(app: web.Application) -> AsyncIterator[None]:
    """Who may do what: GitHub (one HTTP client for every question), our tokens (the store)."""
    settings = app[SETTINGS]
    session = None
    github = None
    if settings.auth and settings.auth_provider == "github":
        session = aiohttp.ClientSession()
        github = GitHubClient(
            session,
            settings.github_url,
            settings.github_api_url,
            settings.auth_username,
            settings.auth_password,
        )
    authenticator = Authenticator(
        store=app[STORE],
        github=github,
        read=settings.auth_read,
        write=settings.auth_write,
        ttl=settings.auth_cache_ttl,
    )
    app[GATEKEEPER] = Gatekeeper(settings, authenticator, app[AUDIT], github)
    app[METRICS].watch(lambda: _live(app, github))
    yield
    if session is not None:
        await session.close()


def _live(app: web.Application, github: GitHubClient | None) -> Live:
    """The values the metrics read at a scrape."""
    service, conf = app[SERVICE], app[CONF]
    return Live(
        tasks=service.counts(),
        started=service.started,
        output_bytes=service.output_bytes,
        waiters=app[BUS].waiter_count,
        github=None if github is None else (github.calls, github.failures),
        fetches=None if conf is None or conf.plain_dir is not None else (conf.fetches, conf.failures),
    )


async def shutdown(app: web.Application, grace: float) -> None:
    """The first part of a graceful stop, while the server still answers: refuse new tasks
    (503), answer the waiting long-polls, and give running tasks `grace` seconds to end.
    What is still running after that is killed by the cleanup, and recorded so."""
    app[SERVICE].stop_accepting()
    app[BUS].close()
    await app[SERVICE].wait_idle(grace)


async def _answer_waiters(app: web.Application) -> None:
    # Long-polls answer `changed: false` now instead of holding the shutdown for 30 s.
    app[BUS].close()
