"""The shutdown sequence (ARCHITECTURE.md), one straight line, t = 0 at the
first stop signal. Durable first, never two runs at once: the handoff is
committed before anything is killed, and the requeued jobs are held back
until the old children are surely dead.

Every step is a named verb of the Supervisor, called here in order; this
module decides the order and the bounds, the Supervisor does the work.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

from supervisor import systemd
from supervisor.errors import EXIT_FAILURE, EXIT_OK
from supervisor.logs import event

if TYPE_CHECKING:
    from supervisor.loop import Supervisor

HOLD_MARGIN_S = 2.0  # on top of kill_after: SIGKILL and reaping take time too
STORAGE_BOUND_S = 2.0  # how long a shutdown step may wait for the database


def shut_down(sup: Supervisor) -> int:
    """Run the sequence on `sup`; returns the exit code."""
    settings = sup.config.shutdown
    began = sup.stop_signal_at or sup.clock()
    why = sup.stop_reason()
    sup.stop_claiming()  # 1.
    _drain(sup, settings.drain)  # 2. jobs that finish now complete normally
    _fence_children(sup, settings.kill_after)
    committed, held = _bounded(  # 3. the handoff, in one transaction
        lambda: sup.storage.handoff(sup.server_id, settings.kill_after + HOLD_MARGIN_S, why)
    )
    sup.ignore_outcomes()  # what the children do from here on is not recorded
    if committed:
        ms = (sup.clock() - began) * 1000
        event("handed off jobs %s in %.1f ms after the signal (held until their old runs are dead)",
              [job.id for job in held], ms, event="handed_off", server=sup.server_id,
              jobs=[job.id for job in held], ms=round(ms, 1))
    else:
        event("could not commit the handoff: %s; killing the children anyway, the jobs "
              "will be requeued when other servers see this one is dead", held,
              level=logging.ERROR, event="handoff_failed", server=sup.server_id)
    systemd.notify("STOPPING=1", "STATUS=handing off")  # 4.
    _stop_children(sup, settings.kill_after)  # 5.
    if committed:  # 6. release the hold: the old runs are dead
        released, _ = _bounded(lambda: sup.storage.release_handoff(sup.server_id, held))
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


def _fence_children(sup: Supervisor, kill_after: float) -> None:
    """Before the handoff commits, bring every child's deadline down to
    kill_after + HOLD_MARGIN_S / 2 from now. The hold lasts kill_after +
    HOLD_MARGIN_S from the commit, so even if this process is frozen or
    starved right after the commit, the old runs are dead before the hold
    ends (found by the model: docs/design.md, "The model",
    neg_hold_not_fenced). Not sooner: with kill_after 0s, 64 children that
    all killed their jobs at once beside the commit made it take 300 ms
    instead of 10 (docs/benchmarks.md, section 10); the supervisor kills
    them itself right after the commit (_stop_children)."""
    deadline = min(sup.fence_deadline(), sup.clock() + kill_after + HOLD_MARGIN_S / 2)
    for child in sup.running.values():
        child.renew(deadline)


def _stop_children(sup: Supervisor, kill_after: float) -> None:
    """SIGTERM each child's process group; after kill_after (or at once on
    a second signal) SIGKILL every process left in each child's tree,
    including grandchildren that left the group; reap them all."""
    sup.signal_children(signal.SIGTERM)
    sup.wait_for_children(sup.clock() + kill_after, hurry_ends_wait=True)
    # Also kills orphans of children that died first, re-parented to us.
    sup.kill_all("shutdown: kill_after passed")


def _bounded(call) -> tuple[bool, object]:
    """Run a storage call for at most STORAGE_BOUND_S: (True, its result),
    or (False, the error). A hung database must not hold the children alive
    past the platform's grace, so the call runs in a thread we can abandon
    (the only thread the supervisor ever starts)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except Exception as exc:  # reported by the caller, not lost
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(STORAGE_BOUND_S)
    if "value" in outcome:
        return True, outcome["value"]
    return False, outcome.get("error", f"no answer within {STORAGE_BOUND_S:g}s")


def stop_after_external_handoff(sup: Supervisor) -> int:
    """Another process (`shiftchange handoff`) already requeued our jobs and
    our children are dead: just record that this server has stopped."""
    done, _ = _bounded(lambda: sup.storage.release_handoff(sup.server_id, []))
    event("stopped (handed off from outside)", event="stopped", server=sup.server_id)
    return EXIT_OK if done else EXIT_FAILURE
