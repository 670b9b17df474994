"""The PostgreSQL fixtures work (the server is nobody's leftover child, even in a test
process that is a subreaper), and what the PostgreSQL store stands on holds on this server:
each test's database is its own, and a notification is delivered at its transaction's
commit, never after a rollback."""

from __future__ import annotations

import os
from contextlib import aclosing

import psutil
from psycopg import AsyncConnection, Notify
from psycopg.rows import TupleRow

from pulsar_rest import runner
from tests.postgres import Cluster, subreaper

CHANNEL = "pulsar_test"
DEADLINE = 10.0  # for a notification that should come at once: a failure, never a pace


Connection = AsyncConnection[TupleRow]


async def connect(dsn: str) -> Connection:
    return await AsyncConnection.connect(dsn, autocommit=True)


async def next_notification(listener: Connection) -> Notify:
    """The listener's next notification, failing at the deadline (the generator closed:
    it holds the connection's lock while it runs)."""
    async with aclosing(listener.notifies(timeout=DEADLINE, stop_after=1)) as notifies:
        async for notify in notifies:
            return notify
    raise AssertionError(f"no notification within {DEADLINE} s")


def test_the_server_is_no_child_of_a_subreaper(postgres_cluster: Cluster) -> None:
    """Once an app has run in the test process, it is its tasks' subreaper: a server started
    then must still not be adopted by it (conftest would kill it as left behind)."""
    runner.SUBREAPER.enable()  # what any app run in this process does, for good
    cluster = Cluster(postgres_cluster.bindir)
    try:
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        assert psutil.Process(pid).ppid() != os.getpid()
        assert subreaper() == runner.SUBREAPER.on  # as it was before the start
    finally:
        cluster.stop()
    assert not cluster.dir.exists()


async def test_each_database_is_fresh_and_its_own(postgres_dsn: str, postgres_cluster: Cluster) -> None:
    other = postgres_cluster.new_database()
    assert other != postgres_dsn
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    async with await connect(postgres_dsn) as first, await connect(other) as second:
        assert await (await first.execute(tables)).fetchone() == (0,)
        await first.execute("CREATE TABLE marker (id integer)")
        assert await (await first.execute(tables)).fetchone() == (1,)
        assert await (await second.execute(tables)).fetchone() == (0,)
    postgres_cluster.drop_database(other)


async def test_notify_arrives_at_commit_never_after_rollback(postgres_dsn: str) -> None:
    """Each notification of an open or rolled-back transaction is overtaken by a marker
    committed after it: the order says what came, no wait for an absence needed."""
    async with (
        await connect(postgres_dsn) as listener,
        await connect(postgres_dsn) as sender,
        await connect(postgres_dsn) as other,
    ):
        await listener.execute(f"LISTEN {CHANNEL}")
        notify = "SELECT pg_notify(%s, %s)"

        await sender.execute("BEGIN")
        await sender.execute(notify, (CHANNEL, "committed"))
        await other.execute(notify, (CHANNEL, "marker 1"))  # committed while sender's is open
        assert (await next_notification(listener)).payload == "marker 1"
        await sender.execute("COMMIT")
        got = await next_notification(listener)
        assert (got.channel, got.payload, got.pid) == (CHANNEL, "committed", sender.info.backend_pid)

        await sender.execute("BEGIN")
        await sender.execute(notify, (CHANNEL, "rolled back"))
        await sender.execute("ROLLBACK")
        await sender.execute(notify, (CHANNEL, "marker 2"))
        assert (await next_notification(listener)).payload == "marker 2"
