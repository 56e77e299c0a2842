"""What one wake-up costs beside CPU-bound processes (issue 11).

    python -m benchmarks.wakeups [--spinners 64] [--samples 60]
        [--scheduling normal,idle]

`--spinners` processes spin at jobs.nice 10 in the given scheduling class
(as job processes do); meanwhile this process wakes, `--samples` times,
a thread of its own (a queue put, then the thread's reply) and another
process (a byte over a pipe and back). Each is a wake-up the handoff's path
could take; one JSON line per class, milliseconds. On a machine where a
wake-up waits for the scheduler's tick, the tail shows it.
"""

import argparse
import json
import os
import queue
import statistics
import sys
import threading
import time

from supervisor.processes import JOB_SCHEDULING


def spinner(policy) -> None:
    os.nice(10)
    if policy is not None:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    while True:
        pass


def start_spinners(n: int, scheduling: str) -> list[int]:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            spinner(JOB_SCHEDULING[scheduling])
        pids.append(pid)
    return pids


def thread_round_trips(samples: int) -> list[float]:
    asks: queue.SimpleQueue = queue.SimpleQueue()

    def answer():
        while True:
            asks.get().set()

    threading.Thread(target=answer, daemon=True).start()
    took = []
    for _ in range(samples):
        time.sleep(0.02)  # both sides asleep, as at a SIGTERM
        done = threading.Event()
        began = time.perf_counter()
        asks.put(done)
        done.wait(5)
        took.append(time.perf_counter() - began)
    return took


def process_round_trips(samples: int) -> list[float]:
    ask_r, ask_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ask_w)  # so that the read below ends when the parent closes its end
        while os.read(ask_r, 1):
            os.write(reply_w, b"x")
        os._exit(0)
    took = []
    for _ in range(samples):
        time.sleep(0.02)
        began = time.perf_counter()
        os.write(ask_w, b"x")
        os.read(reply_r, 1)
        took.append(time.perf_counter() - began)
    os.close(ask_w)
    os.waitpid(pid, 0)
    return took


def summary(seconds: list[float]) -> dict:
    ordered = sorted(ms * 1000 for ms in seconds)
    return {"p50_ms": round(statistics.median(ordered), 3), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "max_ms": round(ordered[-1], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeups")
    parser.add_argument("--spinners", type=int, default=64)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--scheduling", default="normal,idle")
    options = parser.parse_args(argv)
    for scheduling in options.scheduling.split(","):
        pids = start_spinners(options.spinners, scheduling)
        try:
            time.sleep(0.5)  # every spinner running
            print(json.dumps({
                "measurement": "wakeup_round_trip", "spinners": options.spinners, "scheduling": scheduling,
                "samples": options.samples, "thread": summary(thread_round_trips(options.samples)),
                "process": summary(process_round_trips(options.samples)),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }), flush=True)
        finally:
            for pid in pids:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
