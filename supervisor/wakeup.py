"""Wake an idle supervisor the moment jobs become claimable.

On PostgreSQL the storage verbs that make jobs claimable send NOTIFY, and
each supervisor LISTENs on a connection of its own whose socket sits in the
main loop's select(), so a requeued job starts on an idle server without
waiting for the next poll.

An enqueue of a few jobs does not wake the whole fleet: it notifies the
channel of its own of a few idle servers (one more than the jobs), chosen at
random in the enqueue's transaction (`pick_targets`); everything else
(bulk enqueues, reaps, handoffs, resumed queues) and any fleet with a
server that does not listen on a channel of its own notifies every server.
A server picked but busy by then is covered by the spare one, by the
claim every server makes when a slot frees, and at worst by the safety
poll. While it listens, the supervisor polls only
every server.safety_poll (a notification lost in a reconnect is found
then); when the connection fails or breaks, it polls every
server.poll_interval again and says so at WARNING, and goes back to the
safety net once LISTEN works again. On other databases this does nothing
and the poll (server.poll_interval) finds the jobs.
"""

import json
import logging
import random
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

from supervisor.logs import event
from supervisor.processes import clock

RETRY_EVERY_S = 1.0  # while the database is down, do not hammer it
WAKE_CHANNEL = "shiftchange_jobs"  # every listening server
# An enqueue of more jobs than this wakes every server: a batch is rare,
# and enough servers may be needed to drain it quickly.
TARGETED_WAKE_MAX = 8
# The first version whose servers listen on a channel of their own.
TARGETED_SINCE = (0, 2)


def server_channel(server_id: str) -> str:
    """The channel only this server listens on (ids are hex: no quoting)."""
    return f"shiftchange_wake_{server_id}"


@dataclass(frozen=True)
class Candidate:
    """A live, running, not quiet server, as an enqueue sees it."""

    id: str
    queues: str  # JSON array, as stored
    concurrency: int
    busy: int  # its processing jobs
    version: str | None


def _listens_on_own_channel(version: str | None) -> bool:
    try:
        return tuple(int(part) for part in (version or "").split(".")[:2]) >= TARGETED_SINCE
    except ValueError:
        return False


def wakes_everyone(wanted: dict[str, int]) -> bool:
    """Too many jobs for a few servers: notify the shared channel."""
    return sum(wanted.values()) > TARGETED_WAKE_MAX


def pick_targets(candidates: list[Candidate], wanted: dict[str, int], rng=random) -> list[str] | None:
    """Which servers to notify for `wanted` ({queue: jobs made claimable}):
    for each queue, one more idle server than jobs, at random among those
    serving it. None means notify everyone: too many jobs, or a server
    serving one of these queues listens only on the shared channel (an
    older version). An empty list: no server is idle, so none needs waking
    (each claims when a slot of its own frees)."""
    if wakes_everyone(wanted):
        return None
    chosen: list[str] = []
    for queue, count in wanted.items():
        serving = [c for c in candidates if queue in json.loads(c.queues)]
        if not all(_listens_on_own_channel(c.version) for c in serving):
            return None
        idle = [c.id for c in serving if c.busy < c.concurrency and c.id not in chosen]
        chosen += rng.sample(idle, min(len(idle), count + 1))
    return chosen


class Wakeups:
    def __init__(self, engine):
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self.connection = None
        self.own_channel: str | None = None  # this server's, once it has an id
        self.retry_at = 0.0
        self.warned = False  # told the operator that wake-ups are off

    @property
    def listening(self) -> bool:
        """True while notifications can reach us: polling is a safety net."""
        return self.connection is not None

    def listen(self, server_id: str) -> bool:
        """Open the LISTEN connection if there is none (at most once per
        RETRY_EVERY_S while it fails), on the shared channel and this
        server's own. Failing is said at WARNING once: an operator must
        know that new jobs wait for the poll meanwhile.
        True when it (re)connected just now: what was enqueued while we
        did not listen sent no notification we saw, so look now."""
        if not self.enabled:
            return False
        if self.connection is not None:
            return self._follow(server_id)
        if clock() < self.retry_at:
            return False
        self.retry_at = clock() + RETRY_EVERY_S
        import psycopg  # only ever enabled on PostgreSQL, whose extra brings it

        try:
            raw = self.engine.raw_connection()
            driver = raw.driver_connection
            raw.detach()  # ours for good, never handed back to the pool
            driver.autocommit = True
            driver.execute(f"LISTEN {WAKE_CHANNEL}")
            driver.execute(f"LISTEN {server_channel(server_id)}")
        except (DBAPIError, psycopg.Error, OSError) as exc:
            if not self.warned:
                event("cannot listen for new jobs (%s); PostgreSQL wake-ups are off, new jobs are "
                      "found by polling every server.poll_interval until it works again", exc,
                      level=logging.WARNING, event="listen_failed")
                self.warned = True
            return False
        self.connection = driver
        self.own_channel = server_channel(server_id)
        if self.warned:
            event("listening for new jobs again; polling only every server.safety_poll", event="listening")
            self.warned = False
        return True

    def _follow(self, server_id: str) -> bool:
        """A server registered anew (declared dead in a partition) has a
        new id: listen on its new channel. True when it did: look now."""
        channel = server_channel(server_id)
        if channel == self.own_channel:
            return False
        import psycopg

        try:
            self.connection.execute(f"UNLISTEN {self.own_channel}")
            self.connection.execute(f"LISTEN {channel}")
        except psycopg.Error as exc:
            self.broken(exc)
            return False
        self.own_channel = channel
        return True

    def fileno(self) -> int | None:
        """The socket to watch; None when there is none, in which case
        polling alone finds new jobs."""
        return None if self.connection is None else self.connection.pgconn.socket

    def drain(self) -> bool:
        """Consume pending notifications; True if any arrived, or if the
        connection broke (the caller then polls at once, and every
        server.poll_interval until listen() works again). A socket that
        select() reports readable with nothing to read is a closed one."""
        if self.connection is None:
            return False
        import psycopg

        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
            woke = False
            while pgconn.notifies() is not None:
                woke = True
            if pgconn.status != psycopg.pq.ConnStatus.OK:
                raise psycopg.OperationalError("the server closed the connection")
            return woke
        except psycopg.Error as exc:
            self.broken(exc)
            return True

    def broken(self, exc) -> None:
        """The LISTEN connection failed after it worked: say so loudly,
        fall back to polling, listen again at the next turn of the loop."""
        event("lost the connection that listens for new jobs (%s); PostgreSQL wake-ups are off, new "
              "jobs are found by polling every server.poll_interval until it works again",
              str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
              level=logging.WARNING, event="listen_failed")
        self.warned = True
        self.close()
        self.retry_at = clock()  # try again at once: the database itself may be fine

    def close(self) -> None:
        if self.connection is not None:
            import psycopg

            try:
                self.connection.close()
            except (psycopg.Error, OSError):
                pass
            self.connection = None
            self.own_channel = None
