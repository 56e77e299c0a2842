"""The peers (Celery, RQ, procrastinate) in the same run as shiftchange, for
the comparison table in docs/benchmarks.md. Needs the `bench` extra."""

from benchmarks.peers import celery_peer, procrastinate_peer, rq_peer

PEERS = {"celery": celery_peer, "rq": rq_peer, "procrastinate": procrastinate_peer}


def run_peers(quick: bool = False):
    observe = 15.0 if quick else 120.0
    for name, peer in PEERS.items():
        yield {"measurement": "peer_takeover", **peer.takeover(grace_s=5.0, observe_s=observe)}
        yield {"measurement": "peer_crash", **peer.crash(observe_s=observe)}
        for concurrency in (2,) if quick else (2, 4):
            for job in ("noop",) if quick else ("noop", "sleep10ms"):
                yield {"measurement": "peer_throughput",
                       **peer.throughput(n_jobs=200 if quick else 2000, concurrency=concurrency, job=job)}
