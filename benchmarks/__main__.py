"""python -m benchmarks run [--quick] [--db sqlite,postgresql] [--only NAME,...] [--peers [--peer-repeats N]]

Prints one JSON line per measurement. --quick is the small version CI runs
so the benchmarks cannot rot; the numbers in docs/benchmarks.md come from a
full run.
"""

import argparse
import json
import shutil
import sys

from benchmarks import scenarios
from benchmarks.procs import temp_workdir

FULL = {
    "handoff": lambda db, wd: scenarios.handoff_commit(db, wd),
    "takeover": lambda db, wd: scenarios.takeover(db, wd),
    "crash": lambda db, wd: scenarios.crash_recovery(db, wd),
    "throughput": lambda db, wd: [*scenarios.throughput(db, wd), *scenarios.throughput(db, wd, job="sleep10ms", n_jobs=1000)],
    "scale": lambda db, wd: [*scenarios.claim_at_scale(db, wd), *scenarios.enqueue_rate(db, wd), *scenarios.idle_statements(db, wd)],
    "footprint": lambda db, wd: scenarios.footprint(db, wd),
    "partition": lambda db, wd: scenarios.partition(db, wd),
    "rolling": lambda db, wd: scenarios.rolling_deploy(db, wd),
}
QUICK = {
    "handoff": lambda db, wd: scenarios.handoff_commit(db, wd, in_flight=(1, 4), runs=2),
    "takeover": lambda db, wd: scenarios.takeover(db, wd, kill_after_values=("0s",), runs=2),
    "crash": lambda db, wd: scenarios.crash_recovery(db, wd, runs=1, settings={
        "aggressive (heartbeat 200ms, dead_after 2s)": {"heartbeat_interval": "200ms", "dead_after": "2s"}}),
    "throughput": lambda db, wd: scenarios.throughput(db, wd, n_jobs=100, concurrencies=(2,), repeats=1),
    "scale": lambda db, wd: [*scenarios.claim_at_scale(db, wd, small=100, large=1000),
                             *scenarios.enqueue_rate(db, wd, producers=2, per_producer=50),
                             *scenarios.idle_statements(db, wd, seconds=2.0)],
    "footprint": lambda db, wd: scenarios.footprint(db, wd, seconds=1.0),
    "rolling": lambda db, wd: scenarios.rolling_deploy(db, wd, runs=1, servers=2, concurrency=2, n_jobs=3,
                                                       job_steps=40, step_seconds=0.1, apart=0.5),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql,mariadb")
    parser.add_argument("--only", help="comma-separated: " + ",".join(FULL) + " (--quick: all but partition)")
    parser.add_argument("--peers", action="store_true", help="also run Celery, RQ and procrastinate"
                        " (with --only: just the peers' takeover, crash or throughput among those named)")
    parser.add_argument("--peer-repeats", type=int, default=1, help="runs of each peer throughput measurement")
    options = parser.parse_args(argv)
    table = QUICK if options.quick else FULL
    workdir = temp_workdir()
    try:
        for name in (options.only or ",".join(table)).split(","):
            for db in options.db.split(","):
                for result in table[name](db, workdir):
                    print(json.dumps(result), flush=True)
        if options.peers:
            from benchmarks.compare import run_peers

            only = set(options.only.split(",")) if options.only else None
            for result in run_peers(quick=options.quick, only=only, repeats=options.peer_repeats):
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
