"""How long a `shiftchange` command takes, start to exit (issue 11).

    python -m benchmarks.cli_startup [--db sqlite,postgresql,mariadb] [--runs 15]
        [--before CHECKOUT] [--command "status"]

Runs `python -m supervisor COMMAND` `--runs` times per database against an
empty database with the schema, configured as a first run is (a
`shiftchange.yaml` in the working directory), one after another (as
hyperfine would), and prints one JSON line per database and checkout:
median, p90, min and max wall time in ms, the median CPU time (which a busy
machine does not inflate), and the load average. `--before` also runs
another checkout (e.g. `git worktree add /tmp/before main`), taking turns
run by run, so a shared machine's load falls on both alike. Two more lines
per database, measured in the same turns, give the floor no command can go
under on this machine: `python -c pass` ("interpreter") and importing the
database's driver ("driver").
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


DRIVERS = {"sqlite": "sqlite3", "postgresql": "psycopg", "mariadb": "pymysql"}


def time_command(code: Path, argv: list[str], workdir: Path) -> tuple[float, float]:
    """One run of `python ARGV`: (wall time, CPU time used) in ms,
    interpreter start to exit. On a busy machine the wall time grows with
    the load; the CPU time (user + system, from the kernel's accounting)
    does not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    env["PYTHONPATH"] = str(code)
    # An installed package has its bytecode compiled; the warm-up run writes
    # it for a checkout (without it, each run compiles the project's modules).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=workdir, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = (time.perf_counter() - began) * 1000
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
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
            (workdir / "shiftchange.yaml").write_text(f"database:\n  url: {url}\n")
            command = ["-m", "supervisor", *shlex.split(options.command)]
            runs = {"this": (REPO, command),
                    **({"before": (Path(options.before), command)} if options.before else {}),
                    "interpreter": (REPO, ["-c", "pass"]),
                    "driver": (REPO, ["-c", f"import {DRIVERS[db]}"])}
            samples = {label: [] for label in runs}
            loads = []
            for run in range(options.runs + 1):  # the first round warms the page cache; not counted
                for label, (code, argv) in runs.items():
                    took = time_command(code, argv, workdir)
                    if run:
                        samples[label].append(took)
                loads.append(os.getloadavg()[0])
            for label, (code, argv) in runs.items():
                ordered = sorted(wall for wall, _ in samples[label])
                cpu = [cpu for _, cpu in samples[label]]
                print(json.dumps({
                    "measurement": "cli_wall_time", "command": " ".join(argv), "db": db, "code": label,
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
