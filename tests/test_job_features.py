"""The job features of issue 13, with real supervisors on all three
databases: imports from the project directory, results, unique jobs,
timeouts, bulk enqueue and recurring jobs."""

import json
import multiprocessing
import subprocess
import sys
import time

import pytest
import yaml
from sqlalchemy import text

from harness import alive, clean_env, shiftchange, wait_for
from supervisor import JobFailed, Queue
from supervisor.database import Bounds, make_engine
from supervisor.errors import InvalidJob, JobNotFound


@pytest.fixture
def q(db_url):
    with Queue(db_url) as opened:
        yield opened


def finished(q, job_id):
    return wait_for(lambda: (job := q.get(job_id)).state in ("succeeded", "failed") and job,
                    what=f"job {job_id} to finish")


# --- imports ---------------------------------------------------------------------


def test_jobs_import_from_the_working_directory_and_jobs_path(q, db_url, supervisors, tmp_path):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(
        "def work(path):\n    open(path, 'w').write('myapp ran')\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "vendored.py").write_text(
        "def work(path):\n    open(path, 'w').write('vendored ran')\n")
    # PYTHONSAFEPATH: Python itself puts no working directory on sys.path,
    # as with the `shiftchange` console script.
    supervisors(db_url, "s1", env={"PYTHONSAFEPATH": "1"},
                jobs={"allow": ["myapp.*", "vendored:*"], "path": ["lib"]}).wait_registered(q)
    mine = q.enqueue("myapp.tasks:work", [str(tmp_path / "mine")])
    other = q.enqueue("vendored:work", [str(tmp_path / "other")])
    assert finished(q, mine.id).state == "succeeded", q.get(mine.id).error
    assert finished(q, other.id).state == "succeeded", q.get(other.id).error
    assert (tmp_path / "mine").read_text() == "myapp ran"
    assert (tmp_path / "other").read_text() == "vendored ran"


def test_enqueue_warns_when_the_local_allow_list_refuses_the_target(db_url, tmp_path):
    config = tmp_path / "shiftchange.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": db_url}, "jobs": {"allow": ["myapp.*"]}}))
    refused = shiftchange("enqueue", "other.tasks:work", "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 0, refused.stderr
    assert "warning" in refused.stderr and "jobs.allow" in refused.stderr
    allowed = shiftchange("enqueue", "myapp.tasks:work", "--config", str(config), cwd=tmp_path)
    assert allowed.returncode == 0 and "warning" not in allowed.stderr
    with Queue(db_url) as q:
        assert {j.target for j in q.jobs()} == {"other.tasks:work", "myapp.tasks:work"}


# --- results ---------------------------------------------------------------------

FEATURES = {"allow": ["featurejobs:*"], "allow_commands": ["sh"], "max_attempts": 1}


def test_a_callable_s_return_value_is_its_result_and_a_command_keeps_exit_code_and_output(
        q, db_url, supervisors, tmp_path):
    s1 = supervisors(db_url, "s1", jobs=FEATURES)
    s1.wait_registered(q)
    value = {"n": 3, "names": ["a", "b"], "ok": True, "none": None}
    returned = q.enqueue("featurejobs:returns", [value])
    assert q.result(returned.id, timeout=30) == value
    shown = shiftchange("job", str(returned.id), "--json", "--config", str(s1.config_path), cwd=tmp_path)
    assert json.loads(shown.stdout)["result"] == value
    text = shiftchange("job", str(returned.id), "--config", str(s1.config_path), cwd=tmp_path)
    assert '"names": ["a", "b"]' in text.stdout

    nothing = q.enqueue("featurejobs:returns", [None])
    assert q.result(nothing.id, timeout=30) is None

    ok = q.enqueue_command(["sh", "-c", "for i in $(seq 1 30); do echo line $i; done; echo oops >&2"])
    assert q.result(ok.id, timeout=30) == {
        "exit_code": 0, "output": [f"line {i}" for i in range(12, 31)] + ["oops"]}
    bad = q.enqueue_command(["sh", "-c", "echo giving up; exit 3"])
    with pytest.raises(JobFailed, match="exit code 3|exit status 3|3"):
        q.result(bad.id, timeout=30)
    assert q.get(bad.id).result == {"exit_code": 3, "output": ["giving up"]}
    assert "giving up" in s1.log()  # still passed on (its stdout and stderr share the log)


def test_a_return_value_that_is_not_json_fails_the_job_clearly(q, db_url, supervisors):
    supervisors(db_url, "s1", jobs=FEATURES).wait_registered(q)
    job = q.enqueue("featurejobs:returns_object")
    with pytest.raises(JobFailed, match="return value must be JSON-serialisable"):
        q.result(job.id, timeout=30)
    failed = q.get(job.id)
    assert failed.state == "failed" and failed.result is None
    assert "object is not JSON serializable" in failed.error


def test_result_waits_at_most_its_timeout_and_results_are_pruned_with_the_job(q):
    job = q.enqueue("featurejobs:returns", [1])
    with pytest.raises(TimeoutError, match="still enqueued"):
        q.result(job.id, timeout=0.3)
    (claimed,) = q.storage.claim(_server(q), ["default"])
    assert q.storage.complete(claimed.id, claimed.lease, claimed.server, '{"kept": 1}')
    assert q.result(job.id) == {"kept": 1}
    assert q.storage.sweep(keep=-1) == 1
    with pytest.raises(JobNotFound):
        q.result(job.id)


def _server(q):
    return q.storage.register_server(name="t", host="h", pid=1, pid_started_at=None, queues=["default"],
                                     concurrency=1, dead_after=60.0)


def test_a_job_a_0_1_server_completes_has_no_result(q, db_url):
    """docs/design.md, the row of jobs.result: 0.1.0's complete() does not
    know the column."""
    job = q.enqueue("featurejobs:returns", [1])
    (claimed,) = q.storage.claim(_server(q), ["default"])
    with q.engine.begin() as conn:  # 0.1.0's complete(): no result column
        conn.execute(text("UPDATE shiftchange_jobs SET state = 'succeeded', finished_at = 1, error = NULL,"
                          f" checkpoint = NULL WHERE id = {claimed.id} AND lease = {claimed.lease}"))
    assert q.result(job.id) is None


# --- unique jobs -----------------------------------------------------------------


def _produce_unique(url, key, start_at):
    """One producer process: enqueue with `key` at `start_at` (epoch), all
    producers at once; returns (job id, existed)."""
    with Queue(url) as q:
        time.sleep(max(0.0, start_at - time.time()))
        job = q.enqueue("featurejobs:sleep", [0.5], unique_key=key)
        return job.id, job.existed


def test_concurrent_producers_with_one_unique_key_get_one_job(q, db_url, supervisors, tmp_path):
    producers = 6
    with multiprocessing.get_context("spawn").Pool(producers) as pool:
        start_at = time.time() + 6  # after every producer has connected
        done = pool.starmap(_produce_unique, [(db_url, "report-42", start_at)] * producers)
    # (no server yet: the job stays enqueued while they race)
    assert len({job_id for job_id, _ in done}) == 1, done
    assert sorted(existed for _, existed in done) == [False] + [True] * (producers - 1)
    (job_id,) = {job_id for job_id, _ in done}
    assert [j.id for j in q.jobs()] == [job_id]

    # While it waits, the CLI says so and prints its id.
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": db_url}}))
    cli = shiftchange("enqueue", "featurejobs:sleep", "--args", "[0.5]", "--unique-key", "report-42",
                      "--config", str(config), cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == str(job_id) and "already" in cli.stderr
    supervisors(db_url, "s1", jobs=FEATURES)
    assert q.result(job_id, timeout=30) == 0.5
    # Finished: the key is free again.
    again = q.enqueue("featurejobs:sleep", [0.1], unique_key="report-42")
    assert again.id != job_id and not again.existed and again.unique_key == "report-42"
    assert q.result(again.id, timeout=30) == 0.1


def test_a_key_left_set_by_a_0_1_server_is_freed_by_the_next_producer(q):
    """docs/design.md, the row of jobs.unique_active: 0.1.0 finishing a job
    does not clear it; the producer that collides checks the holder."""
    first = q.enqueue("featurejobs:returns", [1], unique_key="k")
    (claimed,) = q.storage.claim(_server(q), ["default"])
    with q.engine.begin() as conn:  # 0.1.0's complete(): it does not know unique_active
        conn.execute(text("UPDATE shiftchange_jobs SET state = 'succeeded', finished_at = 1"
                          f" WHERE id = {claimed.id} AND lease = {claimed.lease}"))
    second = q.enqueue("featurejobs:returns", [2], unique_key="k")
    assert second.id != first.id and not second.existed
    assert q.enqueue("featurejobs:returns", [3], unique_key="k").id == second.id


def test_every_way_out_of_the_active_states_frees_the_key(q):
    server = _server(q)
    failed = q.enqueue("featurejobs:returns", max_attempts=1, unique_key="f")
    (run,) = q.storage.claim(server, ["default"])
    assert q.storage.fail(run.id, run.lease, server, "boom", retry_backoff=0) == "failed"
    assert q.enqueue("featurejobs:returns", unique_key="f").id != failed.id
    deleted = q.enqueue("featurejobs:returns", unique_key="d")
    q.delete(deleted.id)
    assert q.enqueue("featurejobs:returns", unique_key="d").id != deleted.id
    # A failed job requeued by an operator takes its key back when it is free...
    again = q.requeue(failed.id)
    assert again.state == "enqueued"
    # (here it is not: the newer job of "f" holds it, so the requeued one runs as a duplicate)
    newer = q.enqueue("featurejobs:returns", unique_key="f")
    assert newer.existed and newer.id != failed.id
    with pytest.raises(InvalidJob, match="unique_key"):
        q.enqueue("featurejobs:returns", unique_key="")


# --- timeouts --------------------------------------------------------------------


def test_a_timeout_kills_a_tree_that_ignores_sigterm_and_the_run_fails_as_an_attempt(
        q, db_url, supervisors, records):
    supervisors(db_url, "s1", jobs=FEATURES, shutdown={"kill_after": "500ms"}).wait_registered(q)
    job = q.enqueue("featurejobs:stubborn_tree", [str(records)], timeout="1500ms", max_attempts=2)
    pids = wait_for(lambda: (records / "pids").exists() and (records / "pids").read_text().split(),
                    what="the job to record its pids")
    with pytest.raises(JobFailed, match="timed out after 1.5s"):
        q.result(job.id, timeout=30)
    done = q.get(job.id)
    assert done.attempts == 2 and done.error == "timed out after 1.5s", [(e.kind, e.detail) for e in done.events]
    kinds = [e.kind for e in done.events]
    assert kinds.count("retry_scheduled") == 1 and kinds[-1] == "failed"
    for pid in [int(p) for p in pids] + [int(p) for p in (records / "pids").read_text().split()]:
        wait_for(lambda: not alive(pid), timeout=5, what=f"process {pid} of the timed-out tree to be gone")


def test_a_timeout_kills_a_command_tree_that_ignores_sigterm_and_the_run_fails(q, db_url, supervisors, records):
    supervisors(db_url, "s1", jobs=FEATURES, shutdown={"kill_after": "500ms"}).wait_registered(q)
    # sh ignores SIGTERM, and so do its children (an ignored signal stays
    # ignored across exec); the sleep leaves the process group with setsid.
    script = f"trap '' TERM; setsid sleep 600 & echo $$ $! > {records}/pids; wait"
    job = q.enqueue_command(["sh", "-c", script], timeout="1500ms", max_attempts=1)
    pids = wait_for(lambda: (records / "pids").exists() and (records / "pids").read_text().split(),
                    what="the command to record its pids")
    with pytest.raises(JobFailed, match="timed out after 1.5s"):
        q.result(job.id, timeout=30)
    done = q.get(job.id)
    assert done.state == "failed" and done.error == "timed out after 1.5s" and done.attempts == 1
    for pid in (int(p) for p in pids):
        wait_for(lambda: not alive(pid), timeout=5, what=f"process {pid} of the timed-out command to be gone")


def test_the_supervisor_records_a_callable_s_result_when_the_child_could_not(server_queue, server_db_url, supervisors, records):
    """The child gives up on its write after RECORD_TIMEOUT_S (here: the
    job's row is locked by another transaction) and relays the outcome and
    result; the supervisor records both once the database lets it. (Not on
    SQLite: a lock that stops the child's write stops the heartbeat too.)"""
    q, db_url = server_queue, server_db_url
    sup = supervisors(db_url, "s1", jobs=FEATURES, log={"format": "json"})
    sup.wait_registered(q)
    job = q.enqueue("featurejobs:returns_when_told", [str(records), {"kept": [1, 2]}])
    wait_for(lambda: (records / "ready").exists(), what="the job to be about to return")
    # An engine whose idle-in-transaction bound outlasts the child's attempts.
    locker = make_engine(db_url, bounds=Bounds(connect=5, statement=60.0, keepalive_idle=10))
    with locker.connect() as conn:
        locked = conn.begin()
        conn.execute(text("SELECT id FROM shiftchange_jobs WHERE id = :id FOR UPDATE"), {"id": job.id})
        (records / "go").write_text("")
        wait_for(lambda: any(e.get("event") == "db_unreachable" and e.get("job") == job.id for e in sup.events()),
                 timeout=30, what="the child to give up and the supervisor to try")
        assert q.storage.get(job.id).state == "processing"
        locked.rollback()
    locker.dispose()
    assert q.result(job.id, timeout=30) == {"kept": [1, 2]}
    outcome = [e for e in sup.events() if e.get("event") == "succeeded" and e.get("job") == job.id]
    assert len(outcome) == 1 and "recorded by the job's side" not in outcome[0]["message"], outcome


def test_time_spent_enqueued_does_not_count_and_jobs_timeout_is_the_default(q, db_url, supervisors, tmp_path):
    job = q.enqueue("featurejobs:sleep", [1.0], timeout=2)
    config = tmp_path / "producer.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": db_url}, "jobs": {"timeout": "45m"}}))
    cli = shiftchange("enqueue", "featurejobs:sleep", "--args", "[0.1]", "--config", str(config), cwd=tmp_path)
    cli_timeout = shiftchange("enqueue", "featurejobs:sleep", "--args", "[0.1]", "--timeout", "30m",
                              "--config", str(config), cwd=tmp_path)
    bad = shiftchange("enqueue", "featurejobs:sleep", "--timeout", "soon", "--config", str(config), cwd=tmp_path)
    assert bad.returncode == 2 and "--timeout" in bad.stderr
    assert q.get(int(cli.stdout)).timeout == 45 * 60
    assert q.get(int(cli_timeout.stdout)).to_dict()["timeout"] == 30 * 60
    time.sleep(2.5)  # the scenario: it waits enqueued longer than its timeout
    supervisors(db_url, "s1", jobs=FEATURES)
    assert q.result(job.id, timeout=30) == 1.0


# --- bulk enqueue ----------------------------------------------------------------


def test_enqueue_from_a_file_is_all_or_nothing_and_names_the_bad_line(q, db_url, supervisors, tmp_path):
    config = tmp_path / "producer.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": db_url}}))
    lines = [json.dumps({"target": "featurejobs:returns", "args": [n], "priority": n % 3, "queue": "bulk"})
             for n in range(2500)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:1200] + ['{"target": "featurejobs:returns", "args": 5}'] + lines[1200:]))
    refused = shiftchange("enqueue", "--from", str(bad), "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2 and "line 1201" in refused.stderr and "args must be a list" in refused.stderr
    assert q.counts()["enqueued"] == 0

    not_json = subprocess.run([sys.executable, "-m", "supervisor", "enqueue", "--from", "-", "--config",
                               str(config)], input=lines[0] + "\n{nope\n", capture_output=True, text=True,
                              cwd=tmp_path, env=clean_env(), timeout=60)
    assert not_json.returncode == 2 and "-, line 2" in not_json.stderr
    assert q.counts()["enqueued"] == 0

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines[:1500]) + "\n\n" + json.dumps({"target": "featurejobs:returns", "args": [7]})
                    + "\n" + json.dumps({"command": ["sh", "-c", "echo from the file"], "timeout": "1m"}) + "\n")
    done = shiftchange("enqueue", "--from", str(good), "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ids = [int(line) for line in done.stdout.split()]
    assert len(ids) == 1502 and len(set(ids)) == 1502  # over two batches
    assert q.queue_counts()["bulk"]["enqueued"] == 1500
    supervisors(db_url, "s1", jobs=FEATURES)  # serves `default`: the last two
    assert q.result(ids[-2], timeout=60) == 7
    assert q.result(ids[-1], timeout=60)["output"] == ["from the file"]
    assert q.get(ids[-1]).timeout == 60


def test_enqueue_many_checks_every_job_before_inserting_any(q):
    with pytest.raises(InvalidJob, match="job 3: unknown key 'targt'"):
        q.enqueue_many([{"target": "featurejobs:returns"}, {"target": "featurejobs:returns"},
                        {"targt": "featurejobs:returns"}])
    with pytest.raises(InvalidJob, match="job 2: .*not 'package.module:function'"):
        q.enqueue_many([{"target": "featurejobs:returns"}, {"target": "nope"}])
    assert q.counts()["enqueued"] == 0
    ids = q.enqueue_many([{"target": "featurejobs:returns", "args": [n], "unique_key": f"k{n % 2}"}
                          for n in range(4)] + [{"target": "featurejobs:returns",
                                                 "run_at": "2100-01-01T00:00:00Z"}], batch=2)
    assert ids[0] == ids[2] and ids[1] == ids[3] and len(set(ids)) == 3
    assert q.get(ids[4]).state == "scheduled"
