"""The shutdown sequence (ARCHITECTURE.md), one straight line, t = 0 at the
first stop signal. Durable first, never two runs at once: the handoff is
committed before anything is killed, and the requeued jobs are held back
until the old children are surely dead.

Every step is a named verb of the Supervisor, called here in order; this
module decides the order and the bounds, the Supervisor does the work.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING

from supervisor import systemd
from supervisor.dbapi import SQLITE_BUSY_TIMEOUT_S
from supervisor.errors import EXIT_FAILURE, EXIT_OK
from supervisor.logs import event

if TYPE_CHECKING:
    from supervisor.loop import Supervisor

HOLD_MARGIN_S = 2.0  # on top of kill_after: SIGKILL and reaping take time too


def shut_down(sup: Supervisor) -> int:
    """Run the sequence on `sup`; returns the exit code."""
    settings = sup.config.shutdown
    began = sup.stop_signal_at or sup.clock()
    why = sup.stop_reason()
    sup.stop_claiming()  # 1.
    _drain(sup, settings.drain)  # 2. jobs that finish now complete normally
    with _backstop(sup, settings.kill_after):
        return _hand_off_and_stop(sup, began, why, settings.kill_after)


def _hand_off_and_stop(sup: Supervisor, began: float, why: str, kill_after: float) -> int:
    hold = _hold(sup, kill_after)
    committed, held = _call(  # 3. the handoff, in one transaction
        lambda: sup.storage.handoff(sup.server_id, hold, why)
    )
    sup.ignore_outcomes()  # what the children do from here on is not recorded
    if committed:
        ms = (sup.clock() - began) * 1000
        event("handed off jobs %s in %.1f ms after the signal (held until their old runs are dead, "
              "at most %.1fs)", [job.id for job in held], ms, hold, event="handed_off", server=sup.server_id,
              jobs=[job.id for job in held], ms=round(ms, 1), hold_s=round(hold, 1))
    else:
        event("could not commit the handoff: %s; killing the children anyway, the jobs "
              "will be requeued when other servers see this one is dead", held,
              level=logging.ERROR, event="handoff_failed", server=sup.server_id)
    systemd.notify("STOPPING=1", "STATUS=handing off")  # 4.
    _stop_children(sup, kill_after)  # 5.
    if committed:  # 6. release the hold: the old runs are dead
        released, _ = _call(lambda: sup.storage.release_handoff(sup.server_id, held))
        if not released:
            event("could not release the hold; it expires by itself", level=logging.WARNING)
    ms = (sup.clock() - began) * 1000
    event("stopped after %.1f ms", ms, event="stopped", server=sup.server_id, ms=round(ms, 1))
    return EXIT_OK if committed else EXIT_FAILURE  # 7.


def _drain(sup: Supervisor, seconds: float) -> None:
    if seconds <= 0 or not sup.running:
        return
    sup.notice_stop_to_children()
    event("draining for up to %.1fs: %d jobs running; still heartbeating, not claiming",
          seconds, len(sup.running), event="draining")
    sup.drain(seconds)


def _hold(sup: Supervisor, kill_after: float) -> float:
    """How long the handed-off jobs are held back, from the commit: until
    their old runs are certainly dead, even if this process freezes or dies
    right after the commit. Normally it kills them after kill_after and
    releases the hold at once (step 6). If it cannot, each child kills its
    job by itself at its deadline, which only heartbeats renew (there are
    none from here on) and fence_deadline() is the latest of. So: whichever
    comes later, plus a margin for SIGKILL and reaping; only a supervisor
    that never reaches step 6 makes anyone wait for it. Found by the model:
    docs/design.md, "The model", neg_hold_not_fenced. (Bringing 64 children's
    deadlines nearer instead woke them all beside the commit and delayed
    it: docs/benchmarks.md, section 10.)"""
    children_deadline = sup.fence_deadline() - sup.clock()
    return max(kill_after + HOLD_MARGIN_S, children_deadline + HOLD_MARGIN_S / 2)


def _stop_children(sup: Supervisor, kill_after: float) -> None:
    """SIGTERM each child's process group; after kill_after (or at once on
    a second signal) SIGKILL every process left in each child's tree,
    including grandchildren that left the group; reap them all."""
    sup.signal_children(signal.SIGTERM)
    sup.wait_for_children(sup.clock() + kill_after, hurry_ends_wait=True)
    # Also kills orphans of children that died first, re-parented to us.
    sup.kill_all("shutdown: kill_after passed")


def _call(call) -> tuple[bool, object]:
    """A storage call of the sequence: (True, its result), or (False, the
    error). It runs right here, on the main thread, bounded as every
    database call is (database bounds: each round trip, each connect,
    SQLite's busy timeout). It used to run on a thread of its own, bounded
    at 2 s: the two wake-ups that hop took (the thread's, then ours) cost 1-15 ms
    each beside 64 CPU-bound jobs, most of the handoff (docs/benchmarks.md,
    section 10)."""
    try:
        return True, call()
    except Exception as exc:  # reported by the caller, not lost
        return False, exc


@contextmanager
def _backstop(sup: Supervisor, kill_after: float):
    """For what no database bound covers (a DNS lookup on a dead network,
    a disk that hangs): if the sequence is still running when its two
    storage calls and kill_after, each at its bound, should have ended it,
    faulthandler's own thread writes where the process is stuck to stderr
    and exits 1; the children kill their jobs' trees when their lifeline
    closes, and the crash path requeues the jobs. Arming it starts that
    thread (plain C, no GIL), which nothing on the way to the commit waits
    for."""
    bounds = sup.db_bounds
    per_call = max(bounds.connect + bounds.statement, SQLITE_BUSY_TIMEOUT_S)
    faulthandler.dump_traceback_later(2 * per_call + kill_after + HOLD_MARGIN_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def stop_after_external_handoff(sup: Supervisor) -> int:
    """Another process (`shiftchange handoff`) already requeued our jobs and
    our children are dead: just record that this server has stopped."""
    done, _ = _call(lambda: sup.storage.release_handoff(sup.server_id, []))
    event("stopped (handed off from outside)", event="stopped", server=sup.server_id)
    return EXIT_OK if done else EXIT_FAILURE
