"""Database URLs without SQLAlchemy: parsed, masked and given their default
driver exactly as SQLAlchemy's `make_url` does (tests/test_dburl.py checks
both on a table of URLs), so that `status` and `config check` need not
import SQLAlchemy (issue 11)."""

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, quote, quote_plus, unquote

# SQLAlchemy's own pattern (sqlalchemy.engine.url._parse_url).
_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
        """,
    re.X,
)
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


@dataclass(frozen=True)
class DatabaseUrl:
    """The parts of a database URL, as sqlalchemy.engine.URL has them."""

    drivername: str
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    # A key given twice has a tuple of its values.
    query: dict[str, str | tuple[str, ...]] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """`postgresql` of `postgresql+psycopg`."""
        return self.drivername.partition("+")[0]

    def render(self, hide_password: bool = True) -> str:
        """The URL as text (URL.render_as_string), the password as *** unless told."""
        text = self.drivername + "://"
        if self.username is not None:
            text += quote(self.username, safe=" +")
            if self.password is not None:
                text += ":" + ("***" if hide_password else quote(self.password, safe=" +"))
            text += "@"
        if self.host is not None:
            text += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            text += f":{self.port}"
        if self.database is not None:
            text += "/" + quote(self.database, safe=" +/")
        if self.query:
            text += "?" + "&".join(
                f"{quote_plus(key)}={quote_plus(value)}"
                for key in sorted(self.query)
                for value in _values(self.query[key])
            )
        return text

    def __str__(self) -> str:
        return self.render(hide_password=True)


def _values(value) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else (value,)


def parse_url(text: str) -> DatabaseUrl:
    """`text` parsed as make_url parses it; ValueError where make_url
    raises (not a URL, a port that is not a number)."""
    match = _URL.match(text)
    if match is None:
        raise ValueError("Could not parse SQLAlchemy URL from given URL string")
    parts = match.groupdict()
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        query[key] = (*_values(query[key]), value) if key in query else value
    username, password, database = (
        None if parts[name] is None else unquote(parts[name]) for name in ("username", "password", "database")
    )
    return DatabaseUrl(
        drivername=parts["name"],
        username=username,
        password=password,
        host=parts["ipv4host"] or parts["ipv6host"],
        # As make_url: `host:` with no number is an error too (int("")).
        port=None if parts["port"] is None else int(parts["port"]),
        database=database,
        query=query,
    )


def mask_url(url) -> str:
    """The URL with any password replaced by ***, safe for logs and output.
    Takes text, a DatabaseUrl or SQLAlchemy's URL (whose text is masked)."""
    if isinstance(url, DatabaseUrl):
        return url.render(hide_password=True)
    try:
        return parse_url(str(url)).render(hide_password=True)
    except ValueError:  # not a URL, or a port that is not a number
        return _PASSWORD.sub(r"\1***@", str(url))


def default_driver(drivername: str) -> str:
    """The drivers we ship extras for when the URL names none, and
    `postgres://` (as Heroku, Render and Fly hand it out) for PostgreSQL."""
    backend, _, driver = drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        return f"postgresql+{driver or 'psycopg'}"
    if backend in ("mysql", "mariadb") and not driver:
        return backend + "+pymysql"
    return drivername


def with_default_driver(url: DatabaseUrl) -> DatabaseUrl:
    return replace(url, drivername=default_driver(url.drivername))
