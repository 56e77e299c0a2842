"""Wake an idle supervisor the moment jobs become claimable.

On PostgreSQL the storage verbs that make jobs claimable send NOTIFY, and
each supervisor LISTENs on a connection of its own whose socket sits in the
main loop's select(), so a requeued job starts on an idle server without
waiting for the next poll. On other databases this does nothing and the
poll (server.poll_interval) finds the jobs.
"""

import logging

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

    def fileno(self) -> int | None:
        """The socket to watch, connecting (again) if needed; None when
        there is none, in which case polling alone finds new jobs."""
        if not self.enabled:
            return None
        if self.connection is None:
            if clock() < self.retry_at:
                return None
            self.retry_at = clock() + RETRY_EVERY_S
            try:
                raw = self.engine.raw_connection()
                driver = raw.driver_connection
                raw.detach()  # ours for good, never handed back to the pool
                driver.autocommit = True
                driver.execute(f"LISTEN {WAKE_CHANNEL}")
                self.connection = driver
            except Exception as exc:  # the database may be down: poll meanwhile
                event("cannot listen for new jobs (%s); polling only", exc,
                      level=logging.DEBUG, event="listen_failed")
                return None
        return self.connection.pgconn.socket

    def drain(self) -> bool:
        """Consume pending notifications; True if any arrived."""
        if self.connection is None:
            return False
        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
            woke = False
            while pgconn.notifies() is not None:
                woke = True
            return woke
        except Exception:  # the connection broke: listen again next time
            self.close()
            return True

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:
                pass
            self.connection = None
