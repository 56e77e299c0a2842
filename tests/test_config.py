"""The YAML configuration: durations, environment expansion, where the file
is found, and a clear error (key, file, line) for every kind of mistake."""

import dataclasses
import socket
from pathlib import Path

import pytest

from supervisor.config import SCHEMA, Config, load_config, parse_duration
from supervisor.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "shiftchange.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No stray config from the environment; run from an empty directory."""
    monkeypatch.delenv("SHIFTCHANGE_CONFIG", raising=False)
    monkeypatch.delenv("SHIFTCHANGE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)


def write(tmp_path, text, name="shiftchange.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    return str(caught.value)


# --- durations -------------------------------------------------------------------


@pytest.mark.parametrize("value, seconds", [
    ("500ms", 0.5), ("2s", 2), ("1m30s", 90), ("1h", 3600), ("7d", 7 * 86400),
    ("1.5s", 1.5), ("1m 30s", 90), (3, 3), (0.25, 0.25), (0, 0), ("10", 10), ("0.5", 0.5),
])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "2x", "s", "fast", "1m30", True, None, [1], float("inf"), "nan"])
def test_not_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, "-2s", "-1"])
def test_negative_durations_say_so(value):
    with pytest.raises(ValueError, match="negative"):
        parse_duration(value)


def test_a_file_with_durations(tmp_path):
    path = write(tmp_path, "server:\n  heartbeat_interval: 500ms\n  dead_after: 1m30s\nshutdown:\n  drain: 3\n")
    config = load_config(str(path))
    assert (config.server.heartbeat_interval, config.server.dead_after, config.shutdown.drain) == (0.5, 90, 3)


# --- the shipped example file ------------------------------------------------------


def test_the_shipped_file_loads_and_holds_the_defaults():
    """config/shiftchange.yaml lists every key at its built-in default (name
    and concurrency are null there, which means the same: host name, CPUs)."""
    config = load_config(str(SHIPPED))
    assert dataclasses.replace(config, source=None) == Config()
    assert config.server.name == socket.gethostname()


def test_the_shipped_file_lists_every_key_with_a_comment():
    lines = SHIPPED.read_text().splitlines()
    for section, keys in SCHEMA.items():
        assert f"{section}:" in lines
        for key in keys:
            (index,) = [i for i, line in enumerate(lines) if line.startswith(f"  {key}:")]
            assert lines[index - 1].strip().startswith("#"), f"{section}.{key} has no comment"
    text = SHIPPED.read_text()
    assert "grace" in text and "dead_after + heartbeat_interval" in text


# --- environment -------------------------------------------------------------------


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SC_DB_PASSWORD", "pw")
    monkeypatch.setenv("SC_CONCURRENCY", "7")
    monkeypatch.delenv("SC_UNSET", raising=False)
    path = write(tmp_path, (
        "database:\n  url: postgresql://u:${SC_DB_PASSWORD}@db/${SC_UNSET:-jobs}\n"
        "server:\n  concurrency: ${SC_CONCURRENCY}\n  queues: ['${SC_UNSET:-q1}', q2]\n"
        "  dead_after: ${SC_UNSET:-30s}\n"
    ))
    config = load_config(str(path))
    assert config.database.url == "postgresql://u:pw@db/jobs"
    assert config.server.concurrency == 7  # a value that is only a reference is read as YAML
    assert config.server.queues == ("q1", "q2")
    assert config.server.dead_after == 30


def test_a_missing_env_var_names_it_the_key_and_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SC_MISSING", raising=False)
    path = write(tmp_path, "# the database\ndatabase:\n  url: ${SC_MISSING}\n")
    message = error_of(path)
    assert f"{path}:3" in message and "database.url" in message and "SC_MISSING" in message


def test_shiftchange_database_url_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "database:\n  url: sqlite:///from-file.db\n")
    monkeypatch.setenv("SHIFTCHANGE_DATABASE_URL", "sqlite:///from-env.db")
    assert load_config(str(path)).database.url == "sqlite:///from-env.db"
    assert load_config().database.url == "sqlite:///from-env.db"  # over the defaults too


# --- where the file is found ---------------------------------------------------------


def test_lookup_order(tmp_path, monkeypatch):
    option = write(tmp_path, "server:\n  name: from-option\n", "option.yaml")
    env = write(tmp_path, "server:\n  name: from-env\n", "env.yaml")
    assert load_config().server.name == socket.gethostname()  # nothing: built-in defaults
    assert load_config().source is None and load_config().database.url == "sqlite:///shiftchange.db"
    write(tmp_path, "server:\n  name: from-cwd\n")
    assert load_config().server.name == "from-cwd"
    monkeypatch.setenv("SHIFTCHANGE_CONFIG", str(env))
    assert load_config().server.name == "from-env"
    assert load_config(str(option)).server.name == "from-option"


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_named_file_that_does_not_exist_is_an_error(tmp_path, monkeypatch, how):
    missing = tmp_path / "nope.yaml"
    if how == "env":
        monkeypatch.setenv("SHIFTCHANGE_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(str(missing) if how == "option" else None)


def test_empty_file_and_empty_sections_mean_defaults(tmp_path):
    assert dataclasses.replace(load_config(str(write(tmp_path, ""))), source=None) == Config()
    config = load_config(str(write(tmp_path, "server:\njobs:\n  allow:\n")))
    assert dataclasses.replace(config, source=None) == Config()


# --- mistakes: each names the key, the file and the line ----------------------------


@pytest.mark.parametrize("text, line, words", [
    # unknown keys, with a close match when there is one
    ("server:\n  heartbeat_intervall: 1s\n", 2,
     ["unknown key 'server.heartbeat_intervall'", "did you mean server.heartbeat_interval?"]),
    ("servr:\n  name: x\n", 1, ["unknown key 'servr'", "did you mean server?"]),
    ("jobs:\n  allow: []\n  colour: blue\n", 3, ["unknown key 'jobs.colour'"]),
    # wrong types
    ("server:\n  concurrency: four\n", 2, ["server.concurrency", "whole number"]),
    ("server:\n  concurrency: 0\n", 2, ["server.concurrency"]),
    ("server:\n  concurrency: true\n", 2, ["server.concurrency"]),
    ("server:\n  queues: {a: 1}\n", 2, ["server.queues", "list of strings"]),
    ("server:\n  queues: []\n", 2, ["server.queues", "at least one queue"]),
    ("server:\n  queues: ['bad queue']\n", 2, ["server.queues", "not valid"]),
    ("jobs:\n  max_attempts: 1.5\n", 2, ["jobs.max_attempts"]),
    ("jobs:\n  allow: 5\n", 2, ["jobs.allow"]),
    ("jobs:\n  memory_limit: lots\n", 2, ["jobs.memory_limit", "not a size"]),
    ("jobs:\n  reuse_processes: yes please\n", 2, ["jobs.reuse_processes", "true or false"]),
    ("jobs:\n  max_jobs_per_process: 0\n", 2, ["jobs.max_jobs_per_process", "whole number"]),
    ("jobs:\n  max_memory_per_process: big\n", 2, ["jobs.max_memory_per_process", "not a size"]),
    ("log:\n  level: loud\n", 2, ["log.level", "debug, info"]),
    ("jobs:\n  nice: 5\n  scheduling: fifo\n", 3, ["jobs.scheduling", "normal, batch, idle", "'fifo'"]),
    ("database:\n  sqlite_synchronous: off\n", 2, ["database.sqlite_synchronous", "full, normal"]),
    ("database:\n  url: 5\n", 2, ["database.url", "string"]),
    ("server: [1, 2]\n", 1, ["'server' must be a mapping"]),
    ("- just\n- a list\n", 1, ["top level must be a mapping"]),
    ("server:\n  name: !!python/name:os.system x\n", 2, ["server.name", "not a plain YAML value"]),
    # a tagged document or section is not an empty one (docs/security.md: tags are refused)
    ("!!python/object:os.system {}\n", 1, ["top level", "tags", "refused"]),
    ("server: !!python/object:os.system {}\n", 1, ["'server'", "tags", "refused"]),
    # negative and impossible durations
    ("shutdown:\n  kill_after: -2s\n", 2, ["shutdown.kill_after", "negative"]),
    ("shutdown:\n  drain: soon\n", 2, ["shutdown.drain", "not a duration"]),
    ("server:\n  heartbeat_interval: 0s\n  dead_after: 10s\n", 2, ["server.heartbeat_interval", "greater than 0"]),
    ("server:\n  poll_interval: 0\n", 2, ["server.poll_interval", "greater than 0"]),
    ("server:\n  heartbeat_interval: 2s\n  dead_after: 2s\n", 3, ["server.dead_after", "2 x"]),
    # a repeated key (YAML would silently keep the last one)
    ("server:\n  name: a\n  name: b\n", 3, ["server.name is set twice", "first at line 2"]),
    # YAML that does not parse
    ("server:\n  name: [unclosed\n", 3, ["not valid YAML"]),
    ("server:\n\tname: x\n", 2, ["not valid YAML"]),
])
def test_mistakes_name_the_key_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path}:{line}:" in message, message
    for word in words:
        assert word in message, message


def test_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "shiftchange.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert str(path) in error_of(path)


# --- the fence rule: dead_after >= 2 x heartbeat_interval ---------------------------


@pytest.mark.parametrize("heartbeat, dead_after, ok", [
    ("1s", "10s", True), ("1s", "2s", True), ("1s", "1999ms", False), ("1s", "1s", False),
    ("5s", "9s", False), ("500ms", "1s", True),
])
def test_dead_after_must_be_at_least_two_heartbeats(tmp_path, heartbeat, dead_after, ok):
    path = write(tmp_path, f"server:\n  heartbeat_interval: {heartbeat}\n  dead_after: {dead_after}\n")
    if ok:
        load_config(str(path))
    else:
        message = error_of(path)
        assert f"{path}:3:" in message and "server.dead_after" in message
        assert "kills its jobs" in message  # says why


def test_the_fence_rule_points_at_the_key_the_file_sets(tmp_path):
    """Only heartbeat_interval is set: the default dead_after (10s) is too
    short for it, and the message points at heartbeat_interval's line."""
    path = write(tmp_path, "# slow heartbeats\nserver:\n  heartbeat_interval: 6s\n")
    message = error_of(path)
    assert f"{path}:3:" in message and "server.dead_after (10s)" in message


def test_command_line_overrides_are_checked_like_the_file():
    config = Config().with_overrides(name="web-2", concurrency=3, queues=("a", "b"))
    assert (config.server.name, config.server.concurrency, config.server.queues) == ("web-2", 3, ("a", "b"))
    assert Config().with_overrides(name=None, concurrency=None, queues=()) == Config()
    with pytest.raises(ConfigError, match="server.queues"):
        Config().with_overrides(queues=("bad queue",))
