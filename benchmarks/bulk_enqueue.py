"""Bulk enqueue rate (issue 11): `Queue.enqueue_many` and `shiftchange
enqueue --from FILE`, jobs per second.

    python -m benchmarks.bulk_enqueue [--db sqlite,postgresql,mariadb] [--jobs 100000]
        [--unique 0.1] [--cli] [--code CHECKOUT]

`--jobs` dicts as a producer writes them (target, args, kwargs, queue), a
share `--unique` of them with a unique_key, into an empty database; the
clock covers validation, every batch's transaction and the commit. `--cli`
also times `shiftchange enqueue --from FILE` on the same jobs as JSON lines
(interpreter start included). One JSON line per database and way, with the
load average. `--code` runs another checkout (a before/after).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procs import REPO, fresh_database, temp_workdir

TIME_ENQUEUE_MANY = """
import json, sys, time
from supervisor import Queue
jobs = [json.loads(line) for line in open(sys.argv[2])]
with Queue(sys.argv[1]) as queue:
    began = time.perf_counter()
    ids = queue.enqueue_many(jobs)
    took = time.perf_counter() - began
    assert len(ids) == len(jobs)
    print(json.dumps({"seconds": took, "ids": len(set(ids))}))
"""


def job_lines(count: int, unique_share: float) -> list[str]:
    every = round(1 / unique_share) if unique_share else 0
    lines = []
    for n in range(count):
        job = {"target": "myapp.tasks:send", "args": [n, "user@example.org"], "kwargs": {"attempt": 1},
               "queue": "mail"}
        if every and n % every == 0:
            job["unique_key"] = f"send-{n}"
        lines.append(json.dumps(job))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_enqueue")
    parser.add_argument("--db", default="sqlite,postgresql,mariadb")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--unique", type=float, default=0.1, help="share of jobs with a unique_key")
    parser.add_argument("--cli", action="store_true", help="also time `shiftchange enqueue --from FILE`")
    parser.add_argument("--code", default=str(REPO), help="the checkout to run (default: this one)")
    options = parser.parse_args(argv)
    workdir = temp_workdir()
    source = workdir / "jobs.jsonl"
    source.write_text("\n".join(job_lines(options.jobs, options.unique)) + "\n")
    env = dict(os.environ, PYTHONPATH=options.code)
    try:
        for db in options.db.split(","):
            ways = ["enqueue_many"] + (["cli"] if options.cli else [])
            for way in ways:
                url = fresh_database(db, workdir)
                before = os.getloadavg()
                if way == "cli":
                    began = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "supervisor", "enqueue", "--from", str(source)],
                                   env=dict(env, SHIFTCHANGE_DATABASE_URL=url), cwd=workdir,
                                   stdout=subprocess.DEVNULL, check=True)
                    seconds = time.perf_counter() - began
                else:
                    out = subprocess.run([sys.executable, "-c", TIME_ENQUEUE_MANY, url, str(source)], env=env,
                                         cwd=workdir, capture_output=True, text=True, check=True).stdout
                    seconds = json.loads(out)["seconds"]
                print(json.dumps({
                    "measurement": "bulk_enqueue", "way": way, "db": db, "code": options.code,
                    "jobs": options.jobs, "unique_share": options.unique, "seconds": round(seconds, 3),
                    "jobs_per_second": round(options.jobs / seconds),
                    "loadavg_before": [round(x, 2) for x in before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                }), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
