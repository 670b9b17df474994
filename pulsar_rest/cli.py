"""The `pulsar-rest` command: settings, logging, TLS, then serve until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil
from aiohttp import web

from pulsar_rest import clientcli, logfile, memory, migrate, runner, systemd, tokencli
from pulsar_rest.confrepo import RepoUnavailable
from pulsar_rest.datadir import DataDirError, DataDirLock
from pulsar_rest.settings import Settings, SettingsError, load_settings
from pulsar_rest.store import StoreError
from pulsar_rest.tls import TLSError, expiry_warning, server_context
from pulsar_rest.web.accesslog import AccessLogger
from pulsar_rest.web.app import create_app, shutdown
from pulsar_rest.web.signin import SignInSetupError

log = logging.getLogger("pulsar_rest")

# aiohttp's default backlog: connections that wait to be accepted.
LISTEN_BACKLOG = 128


class StartupError(RuntimeError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "token":
        return tokencli.main(argv[1:])
    if argv and argv[0] == "migrate":
        return migrate.main(argv[1:])
    if argv and argv[0] in clientcli.COMMANDS:
        return clientcli.main(argv)
    memory.one_arena()  # before the first thread starts
    runner.reserve_descriptors()  # likewise
    lock: DataDirLock | None = None
    sockets: list[socket.socket] = []
    try:
        settings = load_settings(argv)
        ssl_context = server_context(settings) if settings.tls else None
        # The data directory, then the port, before anything is logged, read or changed: a
        # second server (same data directory, or the port taken) stops here, having
        # touched nothing, least of all the first one's running tasks.
        lock = DataDirLock.claim(settings.data_dir)
        sockets = bind(settings.host, settings.port)
        log_handler = logfile.configure(settings.log_dir, settings.log_format, settings.debug)
        if settings.tls and (warning := expiry_warning(settings)):
            log.warning("%s", warning)
        return asyncio.run(serve(settings, ssl_context, sockets, lock, log_handler))
    except (SettingsError, TLSError, StartupError, DataDirError, logfile.LogFileError) as exc:
        print(f"pulsar-rest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        for sock in sockets:
            sock.close()
        if lock is not None:
            if lock.serving:
                lock.release()
            else:  # a start that never served leaves nothing behind in the data directory
                lock.abandon()
        logfile.stop()


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host` (as asyncio's create_server makes them;
    with port 0, the same free port on each)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


async def serve(
    settings: Settings,
    ssl_context: ssl.SSLContext | None,
    sockets: list[socket.socket],
    lock: DataDirLock,
    log_handler: logging.Handler,
) -> int:
    # handler_cancellation: a long-poll whose client went away is cancelled, which frees
    # its waiter at once instead of at its timeout.
    # Signals are handled before "listening" is logged: a supervisor may signal at once.
    stop = _stop_on_signals()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, logfile.reopen, log_handler)
    # The access log is off by default: formatting a log line costs more than answering a
    # long-poll (40% of a wake-up of 5,000 waiters), and the proxy in front logs requests.
    # Task creations and kills are always logged, with who asked.
    try:
        app = create_app(settings)
    except SignInSetupError as exc:
        raise StartupError(str(exc)) from None
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        access_log_class=AccessLogger,
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
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        urls = [f"{scheme}://{_url_host(host)}:{port}/" for host, port, *_ in runner.addresses]
        for url in urls:
            log.info("listening on %s", url)
        lock.announce(urls)
        # What the start made (modules, the app, the settings) lives as long as the server:
        # moved out of the collector's sight, so a full collection, which requests that build
        # many objects (a page of a thousand tasks) set off every few dozen, walks only what
        # came after. Measured: 45 ms for the largest of those pauses before, 1 ms after.
        gc.collect()
        gc.freeze()
        systemd.notify(f"READY=1\nSTATUS=listening on {', '.join(urls)}\nMAINPID={os.getpid()}")
        await stop.wait()
        log.info("stopping: new tasks refused, running tasks get %gs to end", settings.shutdown_grace)
        systemd.notify("STOPPING=1")
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
