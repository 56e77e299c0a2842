"""The job features of issue 13, with real supervisors on all three
databases: imports from the project directory, results, unique jobs,
timeouts, bulk enqueue and recurring jobs."""

import json

import pytest
import yaml

from harness import shiftchange, wait_for
from supervisor import Queue


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
