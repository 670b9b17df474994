"""A throwaway PostgreSQL cluster for a test session: Debian's server (initdb, pg_ctl) in a
temporary directory, on a free loopback port, without durability (fsync off: nothing here
outlives the session), and a fresh empty database for whoever asks.

initdb and pg_ctl refuse to run as root: as root (CI is) they run as uid/gid 65534 through
setpriv (util-linux), and the directory belongs to 65534. It lives under the system's
temporary directory, not pytest's (/tmp/pytest-of-root is mode 700: the server could not
reach it).

pg_ctl leaves the server running as an orphan: it must not be adopted by this process, which
pulsar-rest makes its tasks' subreaper once a test has run an app in it (runner.Subreaper);
conftest would then find the server among the processes a test left behind, and kill it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

# A directory holding initdb and pg_ctl, instead of the search below (a missing one: as if
# PostgreSQL were not installed, which is how the skip is tried).
BIN_ENV = "PULSAR_TEST_PG_BIN"
NOBODY = 65534  # nobody:nogroup on Debian; setpriv needs no user of that id
TIMEOUT = 30.0  # for any one command: generous, never reached when all is well
START_ATTEMPTS = 3  # a free port may be taken by another process before the server binds it
SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2)


class Missing(Exception):
    """PostgreSQL's server binaries are not there."""


def _version(path: Path) -> tuple[int, ...]:
    """The version of a /usr/lib/postgresql/<version>/bin directory, for sorting."""
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def server_bin() -> Path:
    """The directory of initdb and pg_ctl: $PULSAR_TEST_PG_BIN, else the newest
    /usr/lib/postgresql/*/bin (Debian's, not on PATH), else PATH's initdb."""
    override = os.environ.get(BIN_ENV)
    if override is not None:
        candidates = [Path(override)]
    else:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
        initdb = shutil.which("initdb")
        if initdb is not None:
            candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl")):
            return bindir
    where = f"{BIN_ENV}={override}" if override is not None else "/usr/lib/postgresql/*/bin or PATH"
    raise Missing(
        f"PostgreSQL's server (initdb, pg_ctl) is not in {where} (Debian: apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def subreaper() -> bool:
    """Whether this process is a subreaper (prctl PR_GET_CHILD_SUBREAPER)."""
    flag = ctypes.c_int(0)
    answered = ctypes.CDLL(None).prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    return answered and flag.value != 0


@contextlib.contextmanager
def _no_subreaper() -> Iterator[None]:
    """This process no subreaper meanwhile (prctl), if it was one: what a child leaves
    running goes to init, or to a subreaper above this process."""
    if not subreaper():
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER, 0) failed")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _environ() -> dict[str, str]:
    """This environment without PG* variables of its own (PGDATA, PGPORT, PGOPTIONS...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=_environ(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )  # fmt: skip


def _tail(path: Path, offset: int, lines: int = 20) -> str:
    """The last `lines` lines of `path` written after `offset` (none if it is missing)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _shutdown(pg_ctl: list[str], data: Path, directory: Path) -> None:
    """Stop the server if it runs (no checkpoint: it is thrown away), remove the directory."""
    try:
        if (data / "postmaster.pid").exists():
            _run([*pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Cluster:
    """A running throwaway cluster; `stop()` ends it and removes its directory (so does the
    end of the interpreter, should the session be interrupted before)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="pulsar-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.port = 0
        self._databases = 0
        as_nobody = os.geteuid() == 0
        self._prefix = (
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
        )
        self._finalizer = weakref.finalize(
            self, _shutdown, [*self._prefix, str(bindir / "pg_ctl")], self.data, self.dir
        )
        try:
            if as_nobody:
                os.chown(self.dir, NOBODY, NOBODY)
            self._initdb()
            self._start()
        except BaseException:
            self._finalizer()
            raise

    def _initdb(self) -> None:
        done = _run(
            [*self._prefix, str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
            self.dir,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _start(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {self.dir} {SETTINGS}"
            offset = self.log.stat().st_size if self.log.exists() else 0  # pg_ctl appends
            with _no_subreaper():
                done = _run(
                    [*self._prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                     "-w", "-t", str(int(TIMEOUT)), "-o", options, "start"],
                    self.dir,
                )  # fmt: skip
            if done.returncode == 0:
                self.port = port
                return
            tail = _tail(self.log, offset)
            if "could not bind" not in tail or attempt == START_ATTEMPTS:
                raise RuntimeError(
                    f"PostgreSQL did not start on port {port} ({done.returncode}):\n"
                    f"{done.stdout}{done.stderr}--- the end of its log:\n{tail}"
                )

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database (a copy of template1): its DSN."""
        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=int(TIMEOUT)) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        """Drop the database of `dsn`, closing whatever connection a test left to it."""
        name = conninfo_to_dict(dsn)["dbname"]
        assert isinstance(name, str)
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=int(TIMEOUT)) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        """Stop the server (immediately) and remove its directory; once only."""
        self._finalizer()
