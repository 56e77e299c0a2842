"""Pausing a queue: a storage-level state every server honours at its next
claim; the paused queue's jobs stay enqueued. On all three databases, and
through `shiftchange pause QUEUE` / `shiftchange resume QUEUE`."""

import pytest
from typer.testing import CliRunner

from supervisor import Queue
from supervisor.cli import app
from supervisor.errors import InvalidFilter


@pytest.fixture
def queue(db_url):
    with Queue(db_url) as q:
        yield q


def register(q, name="s1", queues=("default", "mail")):
    return q.storage.register_server(name=name, host="h", pid=1, pid_started_at=None, queues=list(queues),
                                     concurrency=4, dead_after=10.0)


def test_a_paused_queue_is_not_claimed_and_its_jobs_stay_enqueued(queue):
    first, second = register(queue, "s1"), register(queue, "s2")
    mail = [queue.enqueue("app.m:f", queue="mail").id for _ in range(2)]
    default = queue.enqueue("app.m:f").id
    assert queue.pause("mail") is True and queue.pause("mail") is False
    assert queue.paused_queues() == {"mail"}
    # Neither server takes a paused job, even asking for that queue alone.
    assert [job.id for job in queue.storage.claim(first, ["default", "mail"], limit=10)] == [default]
    assert queue.storage.claim(second, ["mail"], limit=10, probe=True) == []
    assert [queue.get(job_id).state for job_id in mail] == ["enqueued", "enqueued"]
    # Enqueueing into a paused queue still works.
    later = queue.enqueue("app.m:f", queue="mail").id
    assert queue.resume("mail") is True and queue.resume("mail") is False
    assert sorted(job.id for job in queue.storage.claim(second, ["mail"], limit=10, probe=True)) == [*mail, later]


def test_resuming_a_queue_never_paused_changes_nothing(queue):
    assert queue.resume("never") is False and queue.paused_queues() == set()


def test_a_bad_queue_name_is_refused(queue):
    with pytest.raises(InvalidFilter):
        queue.pause("no spaces allowed")


def test_the_pause_and_resume_commands(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    monkeypatch.setenv("SHIFTCHANGE_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    with Queue(url) as q:
        q.enqueue("app.m:f", queue="reports")
    runner = CliRunner()
    paused = runner.invoke(app, ["pause", "reports"], catch_exceptions=False)
    assert paused.exit_code == 0 and "paused queue reports" in paused.stdout
    assert "was paused already" in runner.invoke(app, ["pause", "reports"]).stdout
    status = runner.invoke(app, ["status", "--json"], catch_exceptions=False)
    assert '"paused": [\n    "reports"\n  ]' in status.stdout
    with Queue(url) as q:
        assert q.paused_queues() == {"reports"}
    assert "resumed queue reports" in runner.invoke(app, ["resume", "reports"]).stdout
    with Queue(url) as q:
        assert q.paused_queues() == set()
    bad = runner.invoke(app, ["pause", "bad name"])
    assert bad.exit_code == 2 and "is not valid" in bad.stderr
    for command in ("pause", "resume"):
        help_text = runner.invoke(app, [command, "--help"]).stdout
        assert "QUEUE" in help_text and "claim" in help_text
