"""Run peer benchmarks and print one JSON line per result.

    python -m benchmarks.peers <celery|rq|procrastinate|all> <takeover|crash|throughput|all> [--quick]
        [--concurrency 2 4] [--job noop sleep10ms] [--n-jobs N] [--observe-s S] [--grace-s S]
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from typing import Iterator

PEERS = {"celery": "celery_peer", "rq": "rq_peer", "procrastinate": "procrastinate_peer"}
SCENARIOS = ("takeover", "crash", "throughput")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("peer", choices=[*PEERS, "all"])
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--quick", action="store_true", help="smoke-test sizes: 200 jobs, observe_s 15")
    p.add_argument("--concurrency", type=int, nargs="+", default=[2])
    p.add_argument("--job", nargs="+", choices=["noop", "sleep10ms"], default=["noop"])
    p.add_argument("--n-jobs", type=int, help="default 2000 (200 with --quick)")
    p.add_argument("--observe-s", type=float, help="default 120 (15 with --quick)")
    p.add_argument("--grace-s", type=float, default=5.0)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> Iterator[tuple[str, str, dict]]:
    """Yield (peer, scenario, keyword arguments) for every run asked for."""
    n_jobs = args.n_jobs or (200 if args.quick else 2000)
    observe_s = args.observe_s or (15.0 if args.quick else 120.0)
    for peer in PEERS if args.peer == "all" else [args.peer]:
        for scenario in SCENARIOS if args.scenario == "all" else [args.scenario]:
            if scenario == "takeover":
                yield peer, scenario, {"grace_s": args.grace_s, "observe_s": observe_s}
            elif scenario == "crash":
                yield peer, scenario, {"observe_s": observe_s}
            else:
                for job in args.job:
                    for conc in args.concurrency:
                        yield peer, scenario, {"n_jobs": n_jobs, "concurrency": conc, "job": job}


def main(argv: list[str]) -> int:
    # Turn SIGTERM into SystemExit so the adapters' finally blocks still kill workers and clean up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failed = False
    for peer, scenario, kwargs in plan(parse_args(argv)):
        try:
            # Imported lazily so one peer's missing package does not stop the others.
            module = importlib.import_module(f"benchmarks.peers.{PEERS[peer]}")
            result = getattr(module, scenario)(**kwargs)
        except Exception as exc:  # report and go on: one broken peer must not hide the others
            result, failed = {"peer": peer, "scenario": scenario, "error": f"{type(exc).__name__}: {exc}"}, True
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
