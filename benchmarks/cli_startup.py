"""How long a `shiftchange` command takes, start to exit (issue 11).

    python -m benchmarks.cli_startup [--db sqlite,postgresql,mariadb] [--runs 15]
        [--code CHECKOUT] [--command "status"]

Runs `python -m supervisor COMMAND` `--runs` times per database against a
database with the schema and one server row's worth of nothing else, one
after another (as hyperfine would), and prints one JSON line per database:
median, p90, min and max wall time in ms, and the load average. `--code`
runs another checkout (e.g. the main branch) for a before/after on the same
machine at the same time.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procs import REPO, fresh_database, temp_workdir


def time_command(code: Path, url: str, words: list[str], runs: int, workdir: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(code), SHIFTCHANGE_DATABASE_URL=url)
    env.pop("SHIFTCHANGE_CONFIG", None)
    samples = []
    for _ in range(runs + 1):  # the first run warms the page cache; not counted
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "supervisor", *words], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples.append((time.perf_counter() - began) * 1000)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(words)} failed: {done.stderr.strip()}")
    return samples[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--code", default=str(REPO), help="the checkout to run (default: this one)")
    parser.add_argument("--command", default="status", help="the shiftchange command line to time")
    options = parser.parse_args(argv)
    workdir = temp_workdir()
    try:
        for db in options.db.split(","):
            url = fresh_database(db, workdir)
            before = os.getloadavg()
            samples = sorted(time_command(Path(options.code), url, shlex.split(options.command), options.runs, workdir))
            print(json.dumps({
                "measurement": "cli_wall_time", "command": options.command, "db": db, "code": options.code,
                "n": len(samples), "median_ms": round(statistics.median(samples), 1),
                "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 1),
                "min_ms": round(samples[0], 1), "max_ms": round(samples[-1], 1),
                "loadavg_before": [round(x, 2) for x in before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            }), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
