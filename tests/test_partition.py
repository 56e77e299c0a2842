"""A network partition: supervisor `blue` reaches the database through a
relay that black-holes its traffic (packets go nowhere, nothing is closed,
nothing answers), while `green` reaches it directly. No database call may
hang: blue keeps its loop, says what is happening, fences its job, obeys
SIGTERM and registers anew when the partition heals; green reaps blue and
runs the job again, never while blue's run is alive. On PostgreSQL and
MariaDB, whose drivers need bounds of their own.
"""

import signal
import subprocess
import sys
import time

import pytest
from harness import read_lines, runs, wait_for
from sqlalchemy.engine import make_url

from chaos.relay import Relay
from supervisor import Queue
from supervisor.database import bounds_for, make_engine
from supervisor.errors import StorageUnavailable
from supervisor.storage import Storage

pytestmark = pytest.mark.slow

HEARTBEAT, DEAD_AFTER, KILL_AFTER = 0.5, 3.0, 1.0
PARTITION = {
    "server": {"heartbeat_interval": f"{HEARTBEAT}s", "dead_after": f"{DEAD_AFTER}s", "concurrency": 1},
    "shutdown": {"kill_after": f"{KILL_AFTER}s"},
}
BOUNDS = bounds_for(HEARTBEAT, DEAD_AFTER)


@pytest.fixture
def relay(server_db_url):
    url = make_url(server_db_url)
    with Relay(url.host, url.port) as relay:
        relay.url = url.set(port=relay.port).render_as_string(hide_password=False)
        yield relay


@pytest.fixture
def queue(server_db_url):
    with Queue(server_db_url) as q:
        yield q




def dead(pid) -> bool:
    import psutil

    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def blue_running_a_job(queue, relay, supervisors, records):
    """Blue (through the relay) runs a long CPU-bound job; returns blue,
    its server row, the job and the pid of its run."""
    blue = supervisors(relay.url, "blue", **PARTITION)
    first = blue.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    (pid,) = wait_for(lambda: runs(records, job.id), what="blue to run the job")
    return blue, first, job, pid


def test_blue_partitioned_is_fenced_green_reruns_the_job_blue_registers_anew_after(
    queue, relay, supervisors, records
):
    blue, first, job, pid = blue_running_a_job(queue, relay, supervisors, records)
    green = supervisors(queue.engine.url.render_as_string(hide_password=False), "green", **PARTITION)
    green_row = green.wait_registered(queue)

    relay.black_hole()
    wait_for(lambda: "cannot heartbeat" in blue.log(), timeout=DEAD_AFTER + 5,
             what="blue to warn that heartbeats fail")
    wait_for(lambda: dead(pid), timeout=DEAD_AFTER + 2, what="blue's child to fence the job")
    wait_for(lambda: "no heartbeat for too long" in blue.log(), timeout=10,
             what="blue to report that it fenced its children")
    assert blue.proc.poll() is None, "blue must keep serving through a partition\n" + blue.log()
    # Green declares blue dead and runs the job again, once blue's run is dead.
    done = wait_for(lambda: (j := queue.get(job.id)).state == "succeeded" and j, timeout=20,
                    what="green to rerun the job")
    assert done.server == green_row.id and done.interruptions == 1
    assert read_lines(records / "overlaps") == []  # judged by the job's own runs
    assert len(runs(records, job.id)) == 2
    assert {s.id: s.state for s in queue.servers()}[first.id] == "dead"

    relay.heal()
    wait_for(lambda: "declared dead" in blue.log(), timeout=15, what="blue to learn it was declared dead")
    again = wait_for(
        lambda: next((s for s in queue.servers() if s.pid == blue.pid and s.state == "running"
                      and s.id != first.id), None),
        timeout=15, what="blue to register anew",
    )
    assert again.name == "blue"
    log = blue.log()
    assert log.index("cannot heartbeat") < log.index("no heartbeat for too long") < log.index("declared dead")


def test_sigterm_during_a_partition_kills_the_children_and_exits_within_kill_after(
    queue, relay, supervisors, records
):
    blue, first, job, pid = blue_running_a_job(queue, relay, supervisors, records)
    relay.black_hole()
    wait_for(lambda: "cannot heartbeat" in blue.log(), timeout=DEAD_AFTER + 5,
             what="blue to notice the partition")
    began = time.monotonic()
    blue.send(signal.SIGTERM)
    code = blue.wait(timeout=30)
    took = time.monotonic() - began
    assert code == 1, blue.log()  # the handoff could not be committed
    assert "could not commit the handoff" in blue.log()
    assert dead(pid) and blue.survivors() == []
    # Bounded: one database call's bound, the handoff's, then kill_after.
    assert took < KILL_AFTER + BOUNDS.connect + 2 * BOUNDS.statement + 4, f"{took:.1f}s\n{blue.log()}"
    relay.heal()
    # The crash path recovers the job once blue's heartbeat is old enough.
    green = supervisors(queue.engine.url.render_as_string(hide_password=False), "green", **PARTITION)
    green.wait_registered(queue)
    wait_for(lambda: queue.get(job.id).state == "succeeded", timeout=20, what="green to rerun the job")
    assert read_lines(records / "overlaps") == []


@pytest.mark.parametrize("command", [["status"], ["handoff", "--server", "blue"], ["jobs"]], ids=" ".join)
def test_a_command_during_a_partition_gives_up_with_one_line(queue, relay, tmp_path, command):
    relay.black_hole()
    began = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-m", "supervisor", *command], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env=_env(relay.url),
    )
    took = time.monotonic() - began
    assert ran.returncode == 1, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shiftchange: error: cannot reach the database"), ran.stderr
    assert took < 20, f"{took:.1f}s: {ran.stderr}"


def test_every_storage_call_gives_up_on_a_black_hole_within_its_bounds(queue, relay):
    """The verbs a supervisor and a job process use mid-partition, on an
    engine made as theirs are (one open connection, then the black hole)."""
    storage = Storage(make_engine(relay.url, bounds=BOUNDS))
    server_id = storage.register_server(name="blue", host="h", pid=1, pid_started_at=None, queues=["default"],
                                        concurrency=1, dead_after=DEAD_AFTER)
    job = queue.enqueue("scjobs:quick")
    relay.black_hole()
    calls = {
        "heartbeat": lambda: storage.heartbeat(server_id),
        "claim": lambda: storage.claim(server_id, ["default"]),
        "checkpoint": lambda: storage.checkpoint(job.id, 1, server_id, "{}"),
        "handoff": lambda: storage.handoff([server_id], 1.0, "test"),
    }
    for name, call in calls.items():
        began = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call()
        took = time.monotonic() - began
        assert took < max(BOUNDS.connect, BOUNDS.statement) + 1.5, f"{name} took {took:.1f}s"
    relay.heal()
    assert storage.heartbeat(server_id) == "running"  # the pool recovers by itself
    storage.engine.dispose()


def _env(url: str) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    env["SHIFTCHANGE_DATABASE_URL"] = url
    return env
