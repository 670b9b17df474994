"""The `pulsar-rest` command: settings, logging, TLS, then serve until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
from aiohttp import web

from pulsar_rest.confrepo import RepoUnavailable
from pulsar_rest.settings import Settings, SettingsError, load_settings
from pulsar_rest.store import StoreError
from pulsar_rest.tls import TLSError, expiry_warning, server_context
from pulsar_rest.web.app import create_app, shutdown

log = logging.getLogger("pulsar_rest")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StartupError(RuntimeError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
        ssl_context = server_context(settings) if settings.tls else None
        configure_logging(settings)
        if settings.tls and (warning := expiry_warning(settings)):
            log.warning("%s", warning)
        return asyncio.run(serve(settings, ssl_context))
    except (SettingsError, TLSError, StartupError) as exc:
        print(f"pulsar-rest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def configure_logging(settings: Settings) -> None:
    handler: logging.Handler
    if settings.log_dir is None:
        handler = logging.StreamHandler(sys.stdout)
    else:
        path = settings.log_dir / "pulsar-rest.log"
        try:
            settings.log_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise StartupError(f"--log-dir {settings.log_dir}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if settings.debug else logging.INFO)


async def serve(settings: Settings, ssl_context: ssl.SSLContext | None) -> int:
    # handler_cancellation: a long-poll whose client went away is cancelled, which frees
    # its waiter at once instead of at its timeout.
    # Signals are handled before "listening" is logged: a supervisor may signal at once.
    stop = _stop_on_signals()
    # The access log is off by default: formatting a log line costs more than answering a
    # long-poll (40% of a wake-up of 5,000 waiters), and the proxy in front logs requests.
    # Task creations and kills are always logged, with who asked.
    runner = web.AppRunner(
        create_app(settings),
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
    )
    # The first fetch of the configuration repository may take up to git's timeout: a stop
    # asked for meanwhile does not wait for it.
    setup = asyncio.ensure_future(runner.setup())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([setup, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not setup.done():
        setup.cancel()
        _stop_git()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        log.info("stopped while starting")
        return 0
    try:
        setup.result()
    except (StoreError, RepoUnavailable) as exc:
        raise StartupError(str(exc)) from None
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        scheme = "https" if ssl_context else "http"
        for address in runner.addresses:
            host, port = address[:2]
            log.info("listening on %s://%s:%d/", scheme, _url_host(host), port)
        await stop.wait()
        log.info("stopping: new tasks refused, running tasks get %gs to end", settings.shutdown_grace)
        stop.clear()
        graceful = asyncio.ensure_future(shutdown(runner.app, settings.shutdown_grace))
        again = asyncio.ensure_future(stop.wait())
        await asyncio.wait([graceful, again], return_when=asyncio.FIRST_COMPLETED)
        again.cancel()
        if graceful.done():
            graceful.result()
        else:
            # A second SIGTERM or Ctrl-C: the grace is over, running tasks are killed now.
            log.warning("stopping now: running tasks are killed")
            graceful.cancel()
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0


def _stop_git() -> None:
    """Stop the git processes of an abandoned start: the thread that waits for one would
    hold the exit until git's own timeout."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if Path(child.cmdline()[0]).name == "git":
                child.terminate()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
