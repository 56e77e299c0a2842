"""Recording how a run of a job ended: one lease-fenced write.

A process that saw the run end makes it durable, and it is not the
supervisor's loop: the job's child, which gets a callable's outcome from its
job process the moment the job's code ends, or sees a command exit. Then a
supervisor that is frozen, starved of CPU or killed right after cannot turn
a finished run into a rerun (its server would be reaped and the job, still
`processing`, run again). The child, not the job's process, makes the
write: it runs at the supervisor's priority (job processes run at
jobs.nice, and under a full CPU load a niced process took 40% of the
throughput of short jobs to make it), and it outlives a job process killed
once its code has ended. The supervisor records an outcome itself only when that write
could not be made (the database did not answer within RECORD_TIMEOUT_S) or
when only it knows what the end means: a memory-limit kill, a lease an
operator took, a SIGTERM while its server is stopping, a fenced child.

Both writers are fenced by the same lease, and every outcome moves the job
out of `processing`, so at most one of two writes of the same run applies;
the other is refused and leaves a `stale_write` event.
"""

import threading
import time
import traceback

from supervisor.errors import StorageUnavailable

# How long the child tries to record the outcome before leaving it to the
# supervisor. Short: a process that cannot
# reach the database must not hold its slot, and the supervisor keeps
# retrying the write for as long as it takes.
RECORD_TIMEOUT_S = 5.0
RECORDABLE = ("succeeded", "failed", "handoff")  # what a run's own side can tell


def write_outcome(storage, job, server_id: str, kind: str, error: str | None, retry_backoff: float,
                  result: str | None = None, then_claim=None) -> str:
    """The one write that records a finished run, fenced by its lease:
    complete, fail (a retry is scheduled while attempts are left; never for
    `refused`) or give back (`handoff`). `result` (JSON text) is stored with
    a success or a failure in the same write, and so is the claim of a
    reused process's next job (`then_claim`, storage.ClaimNext; never with
    a give back, which could claim the job it gives back). Returns the
    job's new state, or "stale" when the lease is no longer current
    (nothing was applied)."""
    if kind == "succeeded":
        return "succeeded" if storage.complete(job.id, job.lease, server_id, result, then_claim) else "stale"
    if kind == "handoff":
        return storage.give_back(job.id, job.lease, server_id, error or "handed off by the job")
    return storage.fail(
        job.id, job.lease, server_id, error or "failed", retry=kind != "refused", retry_backoff=retry_backoff,
        result=result, then_claim=then_claim,
    )


def record_finished_run(open_storage, job, server_id: str, kind: str, error: str | None,
                        retry_backoff: float, timeout: float = RECORD_TIMEOUT_S,
                        result: str | None = None, then_claim=None) -> str | None:
    """Called once per finished run by the process that saw it end (a
    long-lived slot running many jobs calls it once per job). Returns the new state or "stale";
    None when the write could not be made within `timeout`: the caller then
    tells the supervisor, which records it as it always did.

    The write runs in a thread so that no driver timeout can hold the caller
    longer than `timeout`. A write still in flight when the caller gives up
    and exits either committed or did not; the supervisor's own write of
    the same run is fenced by the same lease, so only one can apply.

    A write that also claims (`then_claim`) and fails with its commit in
    doubt is not blindly retried: storage first says whether that commit
    happened (settled_claim). When the caller gives up on such a write, the
    supervisor, which records the outcome instead, gives back whatever the
    write may still claim (Supervisor._record)."""
    if kind not in RECORDABLE:
        return None
    outcome: list[str] = []
    give_up = time.monotonic() + timeout
    stopped = threading.Event()

    def write():
        delay, in_doubt = 0.05, False
        while True:
            try:
                storage = open_storage()
                settled = in_doubt and storage.settled_claim(then_claim)
                outcome.append(settled or write_outcome(storage, job, server_id, kind, error, retry_backoff, result,
                                                        then_claim))
                return
            except StorageUnavailable:
                in_doubt = then_claim is not None
                if stopped.is_set() or time.monotonic() + delay > give_up:
                    return
                time.sleep(delay)  # a pooled connection broken by a restart is replaced
                delay = min(delay * 2, 1.0)
            except Exception:  # a bug or a schema changed under us: say so, and
                traceback.print_exc()  # leave the write to the supervisor
                return

    writer = threading.Thread(target=write, name="record-outcome", daemon=True)
    writer.start()
    writer.join(timeout)
    stopped.set()
    return outcome[0] if outcome else None
