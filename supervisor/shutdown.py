"""The shutdown sequence (ARCHITECTURE.md), one straight line, t = 0 at the
first stop signal. Durable first, never two runs at once: the handoff is
committed before anything is killed, and the requeued jobs are held back
until the old children are surely dead.
"""

import logging
import signal
import threading

from supervisor import systemd
from supervisor.errors import EXIT_FAILURE, EXIT_OK
from supervisor.logs import event
from supervisor.processes import clock, signal_group

HOLD_MARGIN_S = 2.0  # on top of kill_after: SIGKILL and reaping take time too
STORAGE_BOUND_S = 2.0  # how long a shutdown step may wait for the database


def shut_down(sup) -> int:
    """Run the sequence on Supervisor `sup`; returns the exit code."""
    settings = sup.config.shutdown
    began = sup.stop_signal_at or clock()
    why = _reason(sup)
    sup.claiming = False  # 1. stop claiming
    _drain(sup, settings.drain)  # 2. jobs that finish now complete normally
    _fence_children(sup, settings.kill_after)
    held, committed = _bounded(  # 3. the handoff, in one transaction
        lambda: sup.storage.handoff(sup.server_id, settings.kill_after + HOLD_MARGIN_S, why)
    )
    sup.dropping = True  # what the children do from here on is not recorded
    if committed:
        event("handed off jobs %s in %.1f ms after the signal (held until their old runs are dead)",
              [job.id for job in held], (clock() - began) * 1000, event="handed_off",
              server=sup.server_id, jobs=[job.id for job in held])
    else:
        event("could not commit the handoff: %s; killing the children anyway, the jobs "
              "will be requeued when other servers see this one is dead", held,
              level=logging.ERROR, event="handoff_failed", server=sup.server_id)
    systemd.notify("STOPPING=1", "STATUS=handing off")  # 4.
    _stop_children(sup, settings.kill_after)  # 5.
    if committed:  # 6. release the hold: the old runs are dead
        _, released = _bounded(lambda: sup.storage.release_handoff(sup.server_id, held))
        if not released:
            event("could not release the hold; it expires by itself", level=logging.WARNING)
    event("stopped after %.1f ms", (clock() - began) * 1000, event="stopped", server=sup.server_id)
    return EXIT_OK if committed else EXIT_FAILURE  # 7.


def _reason(sup) -> str:
    name = signal.Signals(sup.stop_signal).name if sup.stop_signal else "a stop request"
    return f"server {sup.config.server.name} ({sup.server_id}) received {name}"


def _drain(sup, seconds: float) -> None:
    if seconds <= 0 or not sup.running:
        return
    state, known = _bounded(lambda: sup.storage.heartbeat(sup.server_id))
    if known and state != "running":
        # `shiftchange handoff` took our jobs already: their holds do not
        # cover a drain, so the children must not keep running.
        event("server is %s already: no drain", state, event="draining")
        return
    for child in sup.running.values():
        child.notice_stop()
    event("draining for up to %.1fs: %d jobs running", seconds, len(sup.running), event="draining")
    sup.wait_for_children(clock() + seconds, hurry_ends_wait=True)


def _fence_children(sup, kill_after: float) -> None:
    """Before the handoff commits, bring every child's deadline down to
    kill_after from now. The hold lasts kill_after + HOLD_MARGIN_S from the
    commit, so even if this process is frozen or starved right after the
    commit, the old runs are dead before the hold ends (found by the model:
    docs/design.md, "The model", neg_hold_not_fenced)."""
    deadline = min(sup.fence_deadline(), clock() + kill_after)
    for child in sup.running.values():
        child.renew(deadline)


def _stop_children(sup, kill_after: float) -> None:
    """SIGTERM each child's process group; after kill_after (or at once on
    a second signal) SIGKILL every process left in each child's tree,
    including grandchildren that left the group; reap them all."""
    for child in sup.running.values():
        signal_group(child.pid, signal.SIGTERM)
    sup.wait_for_children(clock() + kill_after, hurry_ends_wait=True)
    # Also kills orphans of children that died first, re-parented to us.
    sup.kill_all("shutdown: kill_after passed")


def _bounded(call):
    """Run a storage call for at most STORAGE_BOUND_S: (result, True), or
    (the error, False). A hung database must not hold the children alive
    past the platform's grace, so the call runs in a thread we can abandon."""
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
        return outcome["value"], True
    return outcome.get("error", f"no answer within {STORAGE_BOUND_S:g}s"), False


def stop_after_external_handoff(sup) -> int:
    """Another process (`shiftchange handoff`) already requeued our jobs and
    our children are dead: just record that this server has stopped."""
    _, done = _bounded(lambda: sup.storage.release_handoff(sup.server_id, []))
    event("stopped (handed off from outside)", event="stopped", server=sup.server_id)
    return EXIT_OK if done else EXIT_FAILURE
