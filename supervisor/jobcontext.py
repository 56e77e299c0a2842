"""What job code sees of shiftchange: `from supervisor import current_job`."""

import asyncio
import threading
import time

from supervisor.errors import LeaseLost, NotInJob, StorageUnavailable
from supervisor.jobspec import to_json

_current = None
# How long checkpoint() retries a database it cannot reach (a restart, a
# failover) before the error reaches job code. Retrying cannot outlive the
# lease: a supervisor that cannot heartbeat has the job killed by its child.
CHECKPOINT_RETRY_S = 30.0


class JobContext:
    """The running job: its id, attempt, saved progress and stop notice."""

    def __init__(self, job, lease: int, server_id: str, open_storage):
        self.id: int = job.id
        self.attempt: int = job.attempts
        self.interruptions: int = job.interruptions
        self.checkpoint_data = job.checkpoint
        self._lease = lease
        self._server_id = server_id
        self._open_storage = open_storage
        self._storage = None
        self._stopping = threading.Event()
        self._async_waiters: set = set()  # (loop, future) of wait_stopping_async calls
        self._lock = threading.Lock()

    def checkpoint(self, data) -> None:
        """Save `data` (JSON-serialisable) as this job's progress. A resumed
        run, here or on another server, starts with it as checkpoint_data.
        Raises LeaseLost if this run no longer owns the job (it was handed
        off or its server was declared dead): let it propagate."""
        try:
            text = to_json(data, "checkpoint data")
        except Exception as exc:  # InvalidJob, but job code expects TypeError
            raise TypeError(str(exc)) from None
        if not self._save(text):
            raise LeaseLost(
                f"job {self.id} was taken from this run (handed off or reaped); "
                "its checkpoint was not saved"
            )
        self.checkpoint_data = data

    def _storage_for_run(self):
        """This run's own connection, opened on first use: checkpoints and
        the outcome its process records at the end go through it."""
        if self._storage is None:
            self._storage = self._open_storage()
        return self._storage

    async def checkpoint_async(self, data) -> None:
        """checkpoint() for coroutines: the database round trip (and its
        retries) runs in a thread, so the event loop keeps serving the
        job's other tasks meanwhile. Same errors as checkpoint()."""
        await asyncio.to_thread(self.checkpoint, data)

    def _save(self, text: str) -> bool:
        """The lease-fenced write, retried while the database is briefly
        unreachable: a blip is an interruption, not the job's failure. The
        write is idempotent (same data, same lease)."""
        delay, give_up = 0.1, time.monotonic() + CHECKPOINT_RETRY_S
        while True:
            try:
                return self._storage_for_run().checkpoint(self.id, self._lease, self._server_id, text)
            except StorageUnavailable:
                if time.monotonic() + delay > give_up:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @property
    def stopping(self) -> bool:
        """True once the supervisor has begun shutting down: save a
        checkpoint and raise HandOff to resume elsewhere."""
        return self._stopping.is_set()

    def wait_stopping(self, timeout: float | None = None) -> bool:
        """Block until the stop notice comes or `timeout` passes; returns
        `stopping`."""
        return self._stopping.wait(timeout)

    async def wait_stopping_async(self, timeout: float | None = None) -> bool:
        """wait_stopping() for coroutines: await the stop notice (or
        `timeout`) without blocking the event loop; returns `stopping`."""
        if self._stopping.is_set():
            return True
        waiter = (asyncio.get_running_loop(), asyncio.get_running_loop().create_future())
        with self._lock:
            self._async_waiters.add(waiter)
        if self._stopping.is_set():  # the notice came while we registered
            _wake(*waiter)
        try:
            await asyncio.wait([waiter[1]], timeout=timeout)
        finally:
            with self._lock:
                self._async_waiters.discard(waiter)
        return self.stopping

    def _notice_stop(self) -> None:
        """Called from the thread that reads stop notices."""
        self._stopping.set()
        with self._lock:
            waiters = list(self._async_waiters)
        for waiter in waiters:
            _wake(*waiter)


def _wake(loop, future) -> None:
    """Resolve a wait_stopping_async future from any thread."""
    def resolve():
        if not future.done():
            future.set_result(True)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        pass  # the loop is closed: nobody waits any more


def current_job() -> JobContext:
    """The context of the job running in this process, or NotInJob."""
    if _current is None:
        raise NotInJob("current_job() is only available inside a running shiftchange job")
    return _current


def _enter(context: JobContext | None) -> None:
    global _current
    _current = context
