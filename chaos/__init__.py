"""Chaos and load runs for shiftchange: real supervisors, real signals, a
real database that restarts and goes away, and a check of every invariant
of ARCHITECTURE.md afterwards.

    python -m chaos run  [--db postgresql|sqlite] [--seconds 90] [--jobs 500] [--seed N]
    python -m chaos load [--db postgresql|sqlite] [--jobs 50000] [--producers 4] [--supervisors 2]

Each prints one JSON object (counts and a `violations` list) and exits 1 on
any violation. Job code lives in chaos.jobs; supervisors get the repository
root on their PYTHONPATH and `chaos.jobs:*` in jobs.allow.
"""
