"""A connection goes back to the pool with no transaction open, and one
that committed is not rolled back again (database._reset_open_transactions:
on MySQL and MariaDB that ROLLBACK was one more round trip after every
commit). Real databases, all three."""

import pytest
from conftest import database_url
from sqlalchemy import func, insert, select

from supervisor import Queue
from supervisor.database import make_engine
from supervisor.tables import queues


@pytest.fixture
def engine(db_url):
    Queue(db_url).close()  # the schema
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def named(conn, name: str) -> int:
    return conn.execute(select(func.count()).select_from(queues).where(queues.c.name == name)).scalar()


def test_a_transaction_left_open_is_rolled_back_when_the_connection_goes_back(engine):
    conn = engine.connect()
    conn.execute(insert(queues).values(name="left open"))  # begun, never committed
    conn.close()
    left = ["left open"]
    if engine.dialect.name != "sqlite":  # (our SQLite connections begin only what we begin)
        raw = engine.raw_connection()  # used without SQLAlchemy's transactions
        raw.cursor().execute("INSERT INTO shiftchange_queues (name, paused) VALUES ('raw', FALSE)")
        raw.close()
        left.append("raw")
    with engine.connect() as conn:
        assert [named(conn, name) for name in left] == [0] * len(left)


def test_what_committed_stays_and_the_next_user_sees_it(engine):
    with engine.connect() as conn, conn.begin():
        conn.execute(insert(queues).values(name="committed"))
    with engine.connect() as conn:
        assert named(conn, "committed") == 1


def test_a_committed_transaction_costs_no_rollback_round_trip_on_mariadb(tmp_path):
    import pymysql

    url = database_url("mariadb", tmp_path)
    Queue(url).close()
    engine = make_engine(url)
    sent = []
    original = pymysql.connections.Connection._execute_command

    def recorded(connection, command, sql):
        sent.append(sql if isinstance(sql, str) else sql.decode())
        return original(connection, command, sql)

    engine.connect().close()  # connected, and the session's bounds set
    try:
        pymysql.connections.Connection._execute_command = recorded
        with engine.connect() as conn, conn.begin():
            conn.execute(insert(queues).values(name="one round trip less"))
        with engine.connect() as conn:
            named(conn, "one round trip less")  # left open: rolled back
    finally:
        pymysql.connections.Connection._execute_command = original
        engine.dispose()
    assert [sql.split()[0] for sql in sent] == ["INSERT", "COMMIT", "SELECT", "ROLLBACK"]
