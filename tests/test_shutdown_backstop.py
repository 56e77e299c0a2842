"""The shutdown's backstop (shutdown._backstop): the sequence's storage
calls run on the main thread, bounded as every database call is; for a wait
that no bound covers, faulthandler's thread ends the process. Real
processes: one stuck inside the backstop must exit 1 and say where it was
stuck; one that leaves it in time must not be ended later."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import time
    from types import SimpleNamespace
    from supervisor import shutdown
    from supervisor.dbapi import Bounds

    def waiting_without_a_bound():
        time.sleep(30)

    shutdown.SQLITE_BUSY_TIMEOUT_S, shutdown.HOLD_MARGIN_S = 0.2, 0.0
    sup = SimpleNamespace(db_bounds=Bounds(connect=0, statement=0.1, keepalive_idle=1))
    with shutdown._backstop(sup, kill_after=0.1):  # armed for 2 * 0.2 + 0.1 = 0.5 s
        {inside}
    print("left the backstop", flush=True)
    time.sleep(1.5)  # three times the backstop: it must be disarmed
    print("still running", flush=True)
""")


@pytest.mark.parametrize("inside, code, out", [
    ("waiting_without_a_bound()", 1, ""),
    ("pass", 0, "left the backstop\nstill running\n"),
], ids=["stuck", "in time"])
def test_a_shutdown_stuck_past_every_bound_exits_1_and_says_where(inside, code, out):
    ran = subprocess.run([sys.executable, "-c", SCRIPT.format(inside=inside)], capture_output=True, text=True,
                         timeout=30)
    assert (ran.returncode, ran.stdout) == (code, out), ran.stderr
    if code:
        assert "Timeout" in ran.stderr and "waiting_without_a_bound" in ran.stderr  # where it was stuck
