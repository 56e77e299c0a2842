"""Wake an idle supervisor the moment jobs become claimable.

On PostgreSQL the storage verbs that make jobs claimable send NOTIFY, and
each supervisor LISTENs on a connection of its own whose socket sits in the
main loop's select(), so a requeued job starts on an idle server without
waiting for the next poll. While it listens, the supervisor polls only
every server.safety_poll (a notification lost in a reconnect is found
then); when the connection fails or breaks, it polls every
server.poll_interval again and says so at WARNING, and goes back to the
safety net once LISTEN works again. On other databases this does nothing
and the poll (server.poll_interval) finds the jobs.
"""

import logging

from sqlalchemy.exc import DBAPIError

from supervisor.logs import event
from supervisor.processes import clock
from supervisor.storage import WAKE_CHANNEL

RETRY_EVERY_S = 1.0  # while the database is down, do not hammer it


class Wakeups:
    def __init__(self, engine):
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self.connection = None
        self.retry_at = 0.0
        self.warned = False  # told the operator that wake-ups are off

    @property
    def listening(self) -> bool:
        """True while notifications can reach us: polling is a safety net."""
        return self.connection is not None

    def listen(self) -> bool:
        """Open the LISTEN connection if there is none (at most once per
        RETRY_EVERY_S while it fails). Failing is said at WARNING once: an
        operator must know that new jobs wait for the poll meanwhile.
        True when it (re)connected just now: what was enqueued while we
        did not listen sent no notification we saw, so look now."""
        if not self.enabled or self.connection is not None or clock() < self.retry_at:
            return False
        self.retry_at = clock() + RETRY_EVERY_S
        import psycopg  # only ever enabled on PostgreSQL, whose extra brings it

        try:
            raw = self.engine.raw_connection()
            driver = raw.driver_connection
            raw.detach()  # ours for good, never handed back to the pool
            driver.autocommit = True
            driver.execute(f"LISTEN {WAKE_CHANNEL}")
        except (DBAPIError, psycopg.Error, OSError) as exc:
            if not self.warned:
                event("cannot listen for new jobs (%s); PostgreSQL wake-ups are off, new jobs are "
                      "found by polling every server.poll_interval until it works again", exc,
                      level=logging.WARNING, event="listen_failed")
                self.warned = True
            return False
        self.connection = driver
        if self.warned:
            event("listening for new jobs again; polling only every server.safety_poll", event="listening")
            self.warned = False
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
