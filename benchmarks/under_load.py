"""The supervisor under full load (issue 11): one command, one JSON line per
measurement.

    python -m benchmarks.under_load [--db sqlite,postgresql,mariadb] [--jobs 64]
        [--runs 20] [--scheduling normal,idle] [--before CHECKOUT]
        [--only handoff,work] [--seconds 10] [--kill-after 0s]

handoff: `--jobs` CPU-bound jobs that ignore SIGTERM run on one supervisor
(concurrency = jobs; on a 2-core machine 32 runnable jobs per core); SIGTERM
-> the jobs durable as `enqueued`, as the supervisor measured it and as seen
from outside (docs/benchmarks.md, section 1), for each `jobs.scheduling`.

work: the jobs' own throughput. `--jobs` CPU-bound jobs count loop turns in
the same `--seconds` window (benchmarks.bjobs:count) while the supervisor
heartbeats beside them; the sum is the work they got done. A scheduling
class that made the supervisor win the CPU by taking it from the jobs would
show here.

The variants (each scheduling class, and `--before`: another checkout, e.g.
`git worktree add /tmp/before main`, at its defaults) take turns run by run,
so a shared machine's load falls on all of them alike. Each line carries
the load average over its runs: a number measured at a load of 12 is an
upper bound.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from benchmarks.procs import Supervisor, fresh_database, temp_workdir, wait_until
from benchmarks.scenarios import handoff_once, handoff_summary
from supervisor import Queue
from supervisor.jobspec import new_job
from supervisor.processes import clock

COUNT = "benchmarks.bjobs:count"


def jobs_work(kind, workdir, tag, n_jobs=64, seconds=10.0, code=None, jobs=None) -> int:
    """Loop turns done by `n_jobs` CPU-bound jobs in one `seconds` window."""
    url = fresh_database(kind, workdir)
    markers = [workdir / f"w-{tag}-{i}" for i in range(n_jobs)]
    # Far enough ahead for every job to be claimed and started first.
    start_at = clock() + 5.0 + n_jobs * 0.1
    until = start_at + seconds
    with Queue(url) as queue:
        queue.storage.enqueue(*(new_job(COUNT, [str(m), start_at, until]) for m in markers))
        sup = Supervisor(url, workdir, f"w-{tag}", code=code, server={"concurrency": n_jobs}, jobs=jobs or {})
        try:
            wait_until(lambda: queue.counts().get("succeeded", 0) == n_jobs, until - clock() + 60, 0.2)
        finally:
            sup.destroy()
    return sum(int(m.read_text()) for m in markers)


def variants(options) -> list[tuple[str, Path | None, dict]]:
    """(label, checkout, jobs.* settings) of each variant compared."""
    chosen = [(kind, None, {"scheduling": kind}) for kind in options.scheduling.split(",")]
    if options.before:
        chosen.insert(0, ("before", Path(options.before), {}))
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.under_load")
    parser.add_argument("--db", default="sqlite,postgresql,mariadb")
    parser.add_argument("--jobs", type=int, default=64, help="CPU-bound jobs in flight")
    parser.add_argument("--runs", type=int, default=20, help="handoffs (work windows) per database and variant")
    parser.add_argument("--scheduling", default="normal,idle", help="jobs.scheduling values to compare")
    parser.add_argument("--before", metavar="CHECKOUT", help="also run this checkout at its defaults")
    parser.add_argument("--only", default="handoff,work")
    parser.add_argument("--seconds", type=float, default=10.0, help="the work window")
    parser.add_argument("--kill-after", default="0s",
                        help="shutdown.kill_after (0s as in docs/benchmarks.md section 1: the children's "
                             "fence then kills every job at once, beside the handoff)")
    options = parser.parse_args(argv)
    workdir = temp_workdir()
    try:
        for what in options.only.split(","):
            for db in options.db.split(","):
                chosen = variants(options)
                samples = {label: [] for label, _, _ in chosen}
                loads = []
                for run in range(options.runs if what == "handoff" else max(1, options.runs // 10)):
                    # Each round starts with another variant: none always runs first.
                    for label, code, jobs in chosen[run % len(chosen):] + chosen[:run % len(chosen)]:
                        tag = f"{db}-{label}-{run}"
                        if what == "handoff":
                            samples[label].append(handoff_once(db, workdir, options.jobs, tag, code, jobs,
                                                               {"kill_after": options.kill_after}))
                        else:
                            samples[label].append(jobs_work(db, workdir, tag, options.jobs, options.seconds,
                                                            code, jobs))
                        loads.append(os.getloadavg()[0])
                for label, _, _ in chosen:
                    result = {"measurement": "handoff_commit" if what == "handoff" else "jobs_work",
                              "db": db, "jobs": options.jobs, "variant": label, "kill_after": options.kill_after,
                              "loadavg_1m_min_max": [round(min(loads), 2), round(max(loads), 2)]}
                    if what == "handoff":
                        result.update(handoff_summary(samples[label]))
                    else:
                        result.update(seconds=options.seconds, loop_turns=samples[label],
                                      loop_turns_per_second=round(sum(samples[label]) / len(samples[label])
                                                                  / options.seconds))
                    print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
