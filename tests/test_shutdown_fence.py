"""Before transaction 1 commits, the children's deadline comes down to
kill_after: a supervisor frozen right after the commit must not keep them
running past the hold (found by the model: model/, neg_hold_not_fenced)."""

import os
from types import SimpleNamespace

from supervisor.children import RunningJob
from supervisor.shutdown import HOLD_MARGIN_S, _fence_children


def _child_with_lifeline():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    child = RunningJob(job=None, pid=0, lifeline=write_end, results=-1, started=0.0)
    return child, read_end


def _deadline_sent(read_end) -> float:
    line = os.read(read_end, 4096).decode().strip()
    os.close(read_end)
    assert line.startswith("R"), line
    return float(line[1:])


def test_children_get_a_deadline_inside_the_hold_before_the_handoff():
    """kill_after + half the margin from now: before the hold (kill_after +
    HOLD_MARGIN_S from the commit, which comes later) ends, and not at once,
    so the children do not all kill their jobs beside the commit."""
    child, lifeline = _child_with_lifeline()
    sup = SimpleNamespace(running={1: child}, fence_deadline=lambda: 600.0, clock=lambda: 500.0)
    _fence_children(sup, kill_after=2.0)
    sent = _deadline_sent(lifeline)
    child.close()
    assert sent == 502.0 + HOLD_MARGIN_S / 2
    assert 502.0 < sent < 502.0 + HOLD_MARGIN_S  # the earliest end of the hold


def test_an_earlier_heartbeat_deadline_is_kept():
    child, lifeline = _child_with_lifeline()
    soon = 500.5
    sup = SimpleNamespace(running={1: child}, fence_deadline=lambda: soon, clock=lambda: 500.0)
    _fence_children(sup, kill_after=2.0)
    sent = _deadline_sent(lifeline)
    child.close()
    assert abs(sent - soon) < 1e-5
