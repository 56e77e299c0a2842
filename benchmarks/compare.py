"""The peers (Celery, RQ, procrastinate) in the same run as shiftchange, for
the comparison table in docs/benchmarks.md. Needs the `bench` extra."""

from benchmarks.peers import celery_peer, procrastinate_peer, rq_peer

PEERS = {"celery": celery_peer, "rq": rq_peer, "procrastinate": procrastinate_peer}


def run_peers(quick: bool = False, only: set[str] | None = None, repeats: int = 1):
    """Each peer's takeover, crash and throughput; `only` picks among
    {"takeover", "crash", "throughput"}, `repeats` runs each throughput
    measurement that many times (one line per run: take medians)."""
    observe = 15.0 if quick else 120.0
    wanted = only or {"takeover", "crash", "throughput"}
    for name, peer in PEERS.items():
        if "takeover" in wanted:
            yield {"measurement": "peer_takeover", **peer.takeover(grace_s=5.0, observe_s=observe)}
        if "crash" in wanted:
            yield {"measurement": "peer_crash", **peer.crash(observe_s=observe)}
        if "throughput" not in wanted:
            continue
        for concurrency in (2,) if quick else (2, 4):
            for job in ("noop",) if quick else ("noop", "sleep10ms"):
                for _ in range(repeats):
                    yield {"measurement": "peer_throughput",
                           **peer.throughput(n_jobs=200 if quick else 2000, concurrency=concurrency, job=job)}
