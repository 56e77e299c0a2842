"""Run `shiftchange` with every SQL statement's time recorded, for the
idle-supervisor benchmark: python -m benchmarks.count_statements OUT run ..."""

import atexit
import sys

from sqlalchemy import event
from sqlalchemy.engine import Engine

from supervisor.processes import clock

out, sys.argv = sys.argv[1], ["shiftchange", *sys.argv[2:]]
stamps: list[float] = []
event.listen(Engine, "before_cursor_execute", lambda *args: stamps.append(clock()))
atexit.register(lambda: open(out, "w").write("\n".join(f"{t:.6f}" for t in stamps)))

from supervisor.cli import main  # noqa: E402  (after the hook is in place)

main()
