"""database.sqlite_synchronous: the choice between a commit that survives
power loss (full, the default) and twice the commits per second (normal) is
in effect on every SQLite connection: the supervisor's, its job processes',
a producer's."""

from sqlalchemy import text

from harness import read_lines, wait_for
from supervisor import Queue
from supervisor.config import Config, DatabaseConfig, JobsConfig, ServerConfig
from supervisor.database import make_engine
from supervisor.loop import Supervisor

FULL, NORMAL = 2, 1  # what PRAGMA synchronous answers


def synchronous_of(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("PRAGMA synchronous")).scalar()


def test_every_connection_of_an_engine_gets_the_setting(sqlite_url):
    for setting, expected in (("full", FULL), ("normal", NORMAL)):
        engine = make_engine(sqlite_url, sqlite_synchronous=setting)
        assert [synchronous_of(engine) for _ in range(2)] == [expected, expected]  # no pool: two connections
        engine.dispose()


def test_full_is_the_default(sqlite_url):
    assert Config().database.sqlite_synchronous == "full"
    engine = make_engine(sqlite_url)
    assert synchronous_of(engine) == FULL
    engine.dispose()


def test_a_producer_and_the_supervisor_use_the_configured_setting(sqlite_url):
    config = Config(database=DatabaseConfig(url=sqlite_url, sqlite_synchronous="normal"),
                    server=ServerConfig(name="s1"), jobs=JobsConfig())
    with Queue(sqlite_url, defaults=config) as queue:
        assert synchronous_of(queue.engine) == NORMAL
    sup = Supervisor(config)
    assert sup.start()
    try:
        assert synchronous_of(sup.storage.engine) == NORMAL
    finally:
        sup.storage.engine.dispose()


def test_a_job_process_connection_uses_the_configured_setting(sqlite_url, supervisors, records):
    with Queue(sqlite_url) as queue:
        sup = supervisors(sqlite_url, "s1", database={"sqlite_synchronous": "normal"})
        sup.wait_registered(queue)
        job = queue.enqueue("scjobs:report_scheduling", [str(records)])
        wait_for(lambda: queue.get(job.id).state == "succeeded", what="the job")
    assert read_lines(records / "scheduling")[0].split()[2] == str(NORMAL)
