"""Run `shiftchange` with every SQL statement's time recorded, for the
idle-supervisor benchmark: python -m benchmarks.count_statements OUT run ..."""

import os
import sys

from sqlalchemy import event
from sqlalchemy.engine import Engine

from supervisor.processes import clock

out, sys.argv = sys.argv[1], ["shiftchange", *sys.argv[2:]]
stamps: list[float] = []
event.listen(Engine, "before_cursor_execute", lambda *args: stamps.append(clock()))
real_exit, supervisor_pid = os._exit, os.getpid()


def write_then_exit(code):
    # `shiftchange run` leaves with os._exit (no atexit): write first. Its
    # forked children exit the same way and must not overwrite the file.
    if os.getpid() == supervisor_pid:
        with open(out, "w") as f:
            f.write("\n".join(f"{t:.6f}" for t in stamps))
    real_exit(code)


os._exit = write_then_exit

from supervisor.cli import main  # noqa: E402  (after the hook is in place)

main()
