"""Wake an idle supervisor the moment jobs become claimable.

On PostgreSQL the storage verbs that make jobs claimable send NOTIFY, and
each supervisor LISTENs on a connection of its own whose socket sits in the
main loop's select(), so a requeued job starts on an idle server without
waiting for the next poll. On other databases this does nothing and the
poll (server.poll_interval) finds the jobs.
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

    def listen(self) -> None:
        """Open the LISTEN connection if there is none (at most once per
        RETRY_EVERY_S while it fails). Failing is said at WARNING once: an
        operator must know that new jobs wait for the poll meanwhile."""
        if not self.enabled or self.connection is not None or clock() < self.retry_at:
            return
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
            return
        self.connection = driver
        if self.warned:
            event("listening for new jobs again", event="listening")
            self.warned = False

    def fileno(self) -> int | None:
        """The socket to watch; None when there is none, in which case
        polling alone finds new jobs."""
        return None if self.connection is None else self.connection.pgconn.socket

    def drain(self) -> bool:
        """Consume pending notifications; True if any arrived."""
        if self.connection is None:
            return False
        import psycopg

        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
            woke = False
            while pgconn.notifies() is not None:
                woke = True
            return woke
        except psycopg.Error:  # the connection broke: listen again next time
            self.close()
            return True

    def close(self) -> None:
        if self.connection is not None:
            import psycopg

            try:
                self.connection.close()
            except (psycopg.Error, OSError):
                pass
            self.connection = None
