"""Command line: `python -m chaos run|load ...` (see chaos/__init__.py)."""

import argparse
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="faults against three supervisors, then check every invariant")
    run.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    run.add_argument("--seconds", type=float, default=90.0)
    run.add_argument("--jobs", type=int, default=500)
    run.add_argument("--seed", type=int)
    run.add_argument("--keep", action="store_true", help="keep the run directory even when all is well")
    load = sub.add_parser("load", help="producers enqueue while supervisors drain")
    load.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    load.add_argument("--jobs", type=int, default=50_000)
    load.add_argument("--producers", type=int, default=4)
    load.add_argument("--supervisors", type=int, default=2)
    load.add_argument("--concurrency", type=int, default=2)
    load.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    # A SIGTERM (a CI timeout) unwinds like Ctrl-C, so the clean-up runs:
    # supervisors killed, PostgreSQL started again.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "run":
        from chaos.run import run as run_chaos

        sys.exit(run_chaos(args.db, args.seconds, args.jobs, args.seed, args.keep))
    from chaos.load import load as run_load

    sys.exit(run_load(args.db, args.jobs, args.producers, args.supervisors, args.concurrency, args.keep))
