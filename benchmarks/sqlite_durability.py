"""What `database.sqlite_synchronous` costs: commits per second on SQLite
with `full` and with `normal` (issue 11).

    python -m benchmarks.sqlite_durability [--commits 500] [--rounds 3]

Each commit is one storage enqueue (one transaction: the job and its
event), without the read-back `Queue.enqueue` adds. The settings take turns round by round, on one file, so the disk
and the machine's load fall on both alike. One JSON line per setting.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

from benchmarks.procs import temp_workdir
from supervisor import Queue
from supervisor.config import Config, DatabaseConfig
from supervisor.jobspec import new_job


def commits_per_second(url: str, setting: str, commits: int) -> float:
    config = Config(database=DatabaseConfig(url=url, sqlite_synchronous=setting))
    spec = new_job("myapp.tasks:send", [1])
    with Queue(url, defaults=config) as queue:
        began = time.perf_counter()
        for _ in range(commits):
            queue.storage.enqueue(spec)
        return commits / (time.perf_counter() - began)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_durability")
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)
    workdir = temp_workdir()
    url = f"sqlite:///{workdir / 'durability.db'}"
    rates = {"full": [], "normal": []}
    try:
        for _ in range(options.rounds):
            for setting in rates:
                rates[setting].append(commits_per_second(url, setting, options.commits))
        for setting, samples in rates.items():
            print(json.dumps({"measurement": "sqlite_commits", "sqlite_synchronous": setting,
                              "commits_per_second": [round(r) for r in samples],
                              "median": round(statistics.median(samples)),
                              "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
