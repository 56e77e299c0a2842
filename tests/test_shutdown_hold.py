"""The handoff's hold outlives the old runs even if the supervisor freezes
or dies right after the commit: the children kill their jobs by themselves
at their own deadline (fence_deadline(), which no heartbeat renews after
the drain), so the hold lasts until then, or until kill_after when that is
later, plus a margin (found by the model: model/, neg_hold_not_fenced)."""

from types import SimpleNamespace

from supervisor.shutdown import HOLD_MARGIN_S, _hold


def _supervisor(now: float, children_deadline: float):
    return SimpleNamespace(clock=lambda: now, fence_deadline=lambda: children_deadline)


def test_the_hold_outlasts_the_childrens_own_deadline():
    """A frozen supervisor kills nothing: its children stop at their
    deadline, 9.5 s from now; the hold, which starts at the commit (later
    than now), ends at least half the margin after that."""
    hold = _hold(_supervisor(now=500.0, children_deadline=509.5), kill_after=0.0)
    assert hold == 9.5 + HOLD_MARGIN_S / 2
    assert 500.0 + hold > 509.5


def test_a_kill_after_longer_than_the_childrens_deadline_sets_the_hold():
    assert _hold(_supervisor(now=500.0, children_deadline=509.5), kill_after=30.0) == 30.0 + HOLD_MARGIN_S


def test_children_past_their_deadline_already_leave_kill_after_and_the_margin():
    """A supervisor whose heartbeats failed: its children are dying now."""
    assert _hold(_supervisor(now=500.0, children_deadline=499.0), kill_after=2.0) == 2.0 + HOLD_MARGIN_S
