"""Database URLs read without SQLAlchemy (supervisor/dburl.py) are read as
SQLAlchemy's make_url reads them, and a read-only connection
(supervisor/dbapi.py) gets from a URL what SQLAlchemy's dialect would hand
the driver: checked on a table of URLs, so the two cannot drift apart."""

import os
import re

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from supervisor.database import _driver_url
from supervisor.dbapi import connect_params, plain_url
from supervisor.dburl import mask_url, parse_url, with_default_driver

URLS = [
    "sqlite:///relative.db",
    "sqlite:///sub/dir/queue.db",
    "sqlite:////var/lib/shiftchange/queue.db",
    "sqlite:////tmp/with space/ü.db",
    "sqlite:////tmp/a%20b%3Fc.db",
    "sqlite://",
    "sqlite:///",
    "sqlite:///:memory:",
    "sqlite:///file:queue.db?mode=ro&uri=true",
    "sqlite+pysqlite:///queue.db",
    "postgresql://u@h/db",
    "postgresql://u:pw@h:5433/db",
    "postgresql://h/db",
    "postgresql://u:@h/db",
    "postgresql://:pw@h/db",
    "postgresql://u:p@ss@h/db",
    "postgresql+psycopg://user:p%40ss%3Aw%2Fo+rd@127.0.0.1:5432/test?sslmode=require",
    "postgresql+psycopg://user:pass@/db?host=/var/run/postgresql",
    "postgresql://user@/db?host=/tmp&application_name=a+b",
    "postgresql://u@/db?host=h1:5432&host=h2:5433",
    "postgresql://u@/db?host=h1,h2&port=5432,5433",
    "postgresql://u@h/db?port=5433",
    "postgresql://u:pw@[::1]:5432/db",
    "postgresql://u@h/db?options=-c%20search_path%3Dx&sslmode=disable",
    "postgresql://u@h/db?a=1&a=2&b=",
    "postgres://u:pw@h/db",
    "postgres+psycopg2://u:pw@h/db",
    "postgresql+nosuchdriver://u:secret@127.0.0.1/db",
    "mysql://root@127.0.0.1:3306/test",
    "mysql+pymysql://u:p%20w@h/db?charset=utf8mb4",
    "mariadb://u:pw@h/db",
    "mariadb://u:pw@h/db?ssl_ca=/ca.pem",
    "mysql://u:pw@h/db?connect_timeout=3",
    "mysql+mysqldb://u:pw@h/db",
    "oracle://u:pw@h/db",
    "postgresql://u:secret@127.0.0.1:notaport/db",
    "postgresql://u:secret@h:/db",
    "not a url",
    "",
]


def sqlalchemys(url: str):
    """make_url's parts, or None where it refuses the URL."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    return (parsed.drivername, parsed.username, parsed.password, parsed.host, parsed.port, parsed.database,
            dict(parsed.query))


def ours(url: str):
    try:
        parsed = parse_url(url)
    except ValueError:
        return None
    return (parsed.drivername, parsed.username, parsed.password, parsed.host, parsed.port, parsed.database,
            parsed.query)


@pytest.mark.parametrize("url", URLS)
def test_a_url_is_parsed_and_rendered_as_sqlalchemy_does(url):
    assert ours(url) == sqlalchemys(url)
    if sqlalchemys(url) is not None:
        for hide in (True, False):
            assert parse_url(url).render(hide_password=hide) == make_url(url).render_as_string(hide_password=hide)
        assert str(parse_url(url)) == str(make_url(url))


def masked_as_before(url) -> str:
    """mask_url as it was, on SQLAlchemy (database.py before issue 11)."""
    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


@pytest.mark.parametrize("url", URLS)
def test_mask_url_masks_as_sqlalchemy_did(url):
    assert mask_url(url) == masked_as_before(url)
    if sqlalchemys(url) is not None:
        assert mask_url(make_url(url)) == mask_url(parse_url(url)) == masked_as_before(url)


@pytest.mark.parametrize("url", URLS)
def test_the_default_driver_is_the_engines(url):
    if sqlalchemys(url) is None:
        return
    assert (with_default_driver(parse_url(url)).render(hide_password=False)
            == _driver_url(url).render_as_string(hide_password=False))


# Where the read-only connection leaves the URL to the engine.
LEFT_TO_THE_ENGINE = {
    "sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file:queue.db?mode=ro&uri=true",
    "postgresql://u@/db?host=h1:5432&host=h2:5433", "postgresql://u@/db?host=h1,h2&port=5432,5433",
    "postgresql://u@h/db?port=5433", "postgresql://u@h/db?a=1&a=2&b=",
    "postgres+psycopg2://u:pw@h/db", "postgresql+nosuchdriver://u:secret@127.0.0.1/db",
    "mariadb://u:pw@h/db?ssl_ca=/ca.pem", "mysql://u:pw@h/db?connect_timeout=3", "mysql+mysqldb://u:pw@h/db",
    "oracle://u:pw@h/db", "postgresql://u:secret@127.0.0.1:notaport/db", "postgresql://u:secret@h:/db",
    "not a url", "",
}


@pytest.mark.parametrize("url", URLS)
def test_a_plain_url_connects_with_what_sqlalchemys_dialect_would_pass(url):
    plain = plain_url(url)
    assert (plain is None) == (url in LEFT_TO_THE_ENGINE)
    if plain is None:
        return
    engine = create_engine(_driver_url(url))  # connects to nothing until used
    args, params = engine.dialect.create_connect_args(engine.url)
    if plain.backend == "sqlite":
        assert args == [os.path.abspath(plain.database)]
        return
    # Not for the driver's own settings: psycopg's type adapters (as the
    # driver's default ones for what status reads), PyMySQL's FOUND_ROWS
    # (which changes only what an UPDATE counts).
    for own in ("context", "client_encoding", "client_flag"):
        params.pop(own, None)
    assert connect_params(plain) == params
