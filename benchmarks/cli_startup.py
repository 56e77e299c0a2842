"""How long a `shiftchange` command takes, start to exit (issue 11).

    python -m benchmarks.cli_startup [--db sqlite,postgresql,mariadb] [--runs 15]
        [--before CHECKOUT] [--command "status"]

Runs `python -m supervisor COMMAND` `--runs` times per database against an
empty database with the schema, one after another (as hyperfine would),
and prints one JSON line per database and checkout: median, p90, min and
max wall time in ms, the median CPU time (which a busy machine does not
inflate), and the load average. `--before` also runs another
checkout (e.g. `git worktree add /tmp/before main`), taking turns run by
run, so a shared machine's load falls on both alike.
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procs import REPO, fresh_database, temp_workdir


def time_command(code: Path, url: str, words: list[str], workdir: Path) -> tuple[float, float]:
    """One run: (wall time, CPU time used) in ms, interpreter start to exit.
    On a busy machine the wall time grows with the load; the CPU time
    (user + system, from the kernel's accounting) does not."""
    env = dict(os.environ, PYTHONPATH=str(code), SHIFTCHANGE_DATABASE_URL=url)
    env.pop("SHIFTCHANGE_CONFIG", None)
    used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "supervisor", *words], cwd=workdir, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = (time.perf_counter() - began) * 1000
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(words)} failed: {done.stderr.strip()}")
    cpu = (used.ru_utime - used_before.ru_utime + used.ru_stime - used_before.ru_stime) * 1000
    return took, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", metavar="CHECKOUT", help="also run this checkout")
    parser.add_argument("--command", default="status", help="the shiftchange command line to time")
    options = parser.parse_args(argv)
    workdir = temp_workdir()
    try:
        for db in options.db.split(","):
            url = fresh_database(db, workdir)
            codes = {"this": REPO, **({"before": Path(options.before)} if options.before else {})}
            samples = {label: [] for label in codes}
            loads = []
            for run in range(options.runs + 1):  # the first round warms the page cache; not counted
                for label, code in codes.items():
                    took = time_command(code, url, shlex.split(options.command), workdir)
                    if run:
                        samples[label].append(took)
                loads.append(os.getloadavg()[0])
            for label, code in codes.items():
                ordered = sorted(wall for wall, _ in samples[label])
                cpu = [cpu for _, cpu in samples[label]]
                print(json.dumps({
                    "measurement": "cli_wall_time", "command": options.command, "db": db, "code": label,
                    "n": len(ordered), "median_ms": round(statistics.median(ordered), 1),
                    "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
                    "min_ms": round(ordered[0], 1), "max_ms": round(ordered[-1], 1),
                    "cpu_median_ms": round(statistics.median(cpu), 1),
                    "loadavg_1m_min_max": [round(min(loads), 2), round(max(loads), 2)],
                }), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
