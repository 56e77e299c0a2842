"""The YAML configuration: where it is found, what each key means, and
errors that name the key, the file and the line.

Every key is declared once in SCHEMA with its parser and default; the frozen
dataclasses below are what the rest of the code receives. A key left empty or
set to null takes its built-in default. config/shiftchange.yaml documents
every key.
"""

import difflib
import math
import os
import re
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from supervisor.dburl import mask_url
from supervisor.errors import ConfigError
from supervisor.jobspec import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_INTERRUPTIONS, RELEASE_WINDOW_S, check_queue_name
from supervisor.recurring import EntryError, RecurringEntry, make_entry

DEFAULT_FILE = "shiftchange.yaml"
ENV_FILE = "SHIFTCHANGE_CONFIG"
ENV_URL = "SHIFTCHANGE_DATABASE_URL"
ENV_RELEASE = "SHIFTCHANGE_RELEASE"  # server.release when the file leaves it unset
ENV_DASHBOARD_TOKEN = "SHIFTCHANGE_DASHBOARD_TOKEN"
PLAIN_MAPPING = "tag:yaml.org,2002:map"


# --- value parsers: each takes the YAML value, returns it or raises ValueError --

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value) -> float:
    """`500ms`, `2s`, `1m30s`, `7d`, or a number of seconds -> seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a duration (examples: 500ms, 2s, 1m30s, 7d)")
    text = str(value).strip().replace(" ", "")
    try:
        seconds = float(text)  # a number, also when quoted or from ${VAR}
    except ValueError:
        if text.startswith("-"):
            raise ValueError(f"{value!r}: a duration cannot be negative") from None
        if not text or _DURATION_PART.sub("", text):
            raise ValueError(f"{value!r} is not a duration (examples: 500ms, 2s, 1m30s, 7d)") from None
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r}: a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{value!r}: a duration cannot be negative")
    return seconds


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?$", re.I)
_SIZE_BYTES = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_timeout(value) -> float | None:
    """A duration greater than 0, or null / 0 for no limit."""
    if value in (None, 0, "0", "none", "null"):
        return None
    return parse_duration(value)


def format_duration(seconds: float) -> str:
    """Seconds as parse_duration reads them: 1800 -> 30m, 90 -> 1m30s."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts, left = [], seconds
    for unit in ("d", "h", "m"):
        whole, left = divmod(left, _UNIT_SECONDS[unit])
        if whole:
            parts.append(f"{whole:.0f}{unit}")
    if left or not parts:
        parts.append(f"{round(left, 3):g}s")
    return "".join(parts)


def parse_size(value) -> int | None:
    """`512MiB`, `2GB`, a number of bytes, or null/0 for no limit."""
    if value in (None, 0, "0", "none", "null"):
        return None
    match = _SIZE.match(str(value).strip())
    if not match or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (examples: 512MiB, 2GB)")
    return int(float(match.group(1)) * _SIZE_BYTES[(match.group(2) or "b").lower()])


def parse_positive_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return value


def parse_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def parse_niceness(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ValueError(f"expected a niceness from 0 to 19, got {value!r}")
    return value


def parse_text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


_RELEASE = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")


def parse_release(value) -> str:
    """A release name: an image tag, a version, a git revision."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # YAML reads 1.10 as the number 1.1: the exact text would be lost.
        raise ValueError(f"{value!r} is a number; quote it (e.g. '{value}') so the release keeps its exact text")
    if not isinstance(value, str) or not _RELEASE.match(value):
        raise ValueError(
            f"{value!r} is not a release name: 1-200 of letters, digits and _ . : @ / + - "
            f"(an image tag or a git revision)"
        )
    return value


def _release_from_env() -> str | None:
    return os.environ.get(ENV_RELEASE) or None


def parse_text_list(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def parse_queues(value) -> tuple[str, ...]:
    queues = parse_text_list(value)
    if not queues:
        raise ValueError("a server must serve at least one queue")
    for name in queues:
        check_queue_name(name)
    return queues


def parse_bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


MIN_TOKEN_CHARS = 16


def parse_token(value) -> str:
    """A secret for the dashboard's actions: long enough not to be guessed."""
    if not isinstance(value, str) or len(value.strip()) < MIN_TOKEN_CHARS:
        raise ValueError(f"expected a secret of at least {MIN_TOKEN_CHARS} characters "
                         "(e.g. from `openssl rand -hex 32`)")
    return value.strip()


def parse_choice(*choices):
    def parse(value) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return parse


# --- the configuration ---------------------------------------------------------


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///shiftchange.db"
    retry_for: float = 60.0  # how long `run` retries an unreachable database
    # SQLite only: `full` fsyncs the WAL at every commit (a commit survives
    # power loss); `normal` at checkpoints only (about 2x faster; the last
    # commits may be lost on power loss, the file is never corrupted).
    sqlite_synchronous: str = "full"


@dataclass(frozen=True)
class ServerConfig:
    name: str = field(default_factory=socket.gethostname)
    queues: tuple[str, ...] = ("default",)
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    heartbeat_interval: float = 1.0
    dead_after: float = 10.0
    poll_interval: float = 0.2
    release: str | None = field(default_factory=_release_from_env)  # the deploy release, e.g. the image tag
    release_window: float = RELEASE_WINDOW_S  # how long a job handed off by release R is left to other releases
    # PostgreSQL, while LISTEN works: NOTIFY wakes the server, and this poll
    # only catches what a lost notification would miss.
    safety_poll: float = 5.0


@dataclass(frozen=True)
class ShutdownConfig:
    drain: float = 0.0
    kill_after: float = 2.0


@dataclass(frozen=True)
class JobsConfig:
    allow: tuple[str, ...] = ()
    allow_commands: tuple[str, ...] = ()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS
    retry_backoff: float = 10.0
    keep_finished: float = 7 * 86400.0
    memory_limit: int | None = None  # bytes per job's process tree
    nice: int = 10  # job processes yield the CPU to the supervisor
    # The job processes' Linux scheduling class (processes.JOB_SCHEDULING):
    # `idle` lets the supervisor preempt them at once, however many there are.
    scheduling: str = "normal"
    # Directories job processes import targets from, after the server's
    # working directory (which is always first, as with Celery and RQ).
    path: tuple[str, ...] = ()
    timeout: float | None = None  # seconds a run may take; a job's own timeout wins
    # Callable jobs run one after another in a reused job process (no fork
    # per job), which is recycled after max_jobs_per_process jobs, once it
    # holds more than max_memory_per_process, and after any run that leaves
    # its state in doubt. false: a fresh process for every job.
    reuse_processes: bool = True
    max_jobs_per_process: int = 1000
    max_memory_per_process: int | None = 512 * 2**20


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class DashboardConfig:
    token: str | None = field(default=None, repr=False)  # None: the dashboard is read-only
    show_args: bool = True  # false hides job arguments and checkpoints (personal data)


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    recurring: tuple[RecurringEntry, ...] = ()  # `recurring:`, a list of entries
    source: str | None = None  # the file it was read from, if any

    def with_overrides(self, **server_values) -> "Config":
        """A copy with `server.*` values (from command-line options) replaced
        where they are given, checked like the same keys in a file."""
        chosen = {}
        for key, value in server_values.items():
            if value in (None, (), []):
                continue
            try:
                chosen[key] = SCHEMA["server"][key](value)
            except ValueError as exc:
                raise ConfigError(f"server.{key} (from the command line): {exc}") from None
        return replace(self, server=replace(self.server, **chosen)) if chosen else self

    def to_dict(self) -> dict:
        """The effective config, with the database password and the
        dashboard token masked."""
        data = {}
        for section in fields(self):
            if section.name in ("source", "recurring"):
                continue
            values = getattr(self, section.name)
            data[section.name] = {
                f.name: list(v) if isinstance(v := getattr(values, f.name), tuple) else v
                for f in fields(values)
            }
        data["database"]["url"] = mask_url(self.database.url)
        if self.dashboard.token is not None:
            data["dashboard"]["token"] = "***"
        data["recurring"] = [entry.definition() | {"name": entry.name} for entry in self.recurring]
        return data


SCHEMA = {
    "database": {"url": parse_text, "retry_for": parse_duration,
                 "sqlite_synchronous": parse_choice("full", "normal")},
    "server": {
        "name": parse_text,
        "queues": parse_queues,
        "concurrency": parse_positive_int,
        "heartbeat_interval": parse_duration,
        "dead_after": parse_duration,
        "poll_interval": parse_duration,
        "release": parse_release,
        "release_window": parse_duration,
        "safety_poll": parse_duration,
    },
    "shutdown": {"drain": parse_duration, "kill_after": parse_duration},
    "jobs": {
        "allow": parse_text_list,
        "allow_commands": parse_text_list,
        "max_attempts": parse_positive_int,
        "max_interruptions": parse_count,
        "retry_backoff": parse_duration,
        "keep_finished": parse_duration,
        "memory_limit": parse_size,
        "nice": parse_niceness,
        "scheduling": parse_choice("normal", "batch", "idle"),
        "path": parse_text_list,
        "timeout": parse_timeout,
        "reuse_processes": parse_bool,
        "max_jobs_per_process": parse_positive_int,
        "max_memory_per_process": parse_size,
    },
    "log": {"format": parse_choice("text", "json"), "level": parse_choice("debug", "info", "warning", "error")},
    "dashboard": {"token": parse_token, "show_args": parse_bool},
}
SECTIONS = {"database": DatabaseConfig, "server": ServerConfig, "shutdown": ShutdownConfig, "jobs": JobsConfig,
            "log": LogConfig, "dashboard": DashboardConfig}


# --- finding and reading the file ------------------------------------------------


def find_config_file(path: str | None) -> Path | None:
    """--config, else $SHIFTCHANGE_CONFIG, else ./shiftchange.yaml if present."""
    if path:
        chosen = Path(path)
    elif os.environ.get(ENV_FILE):
        chosen = Path(os.environ[ENV_FILE])
    else:
        default = Path(DEFAULT_FILE)
        return default if default.is_file() else None
    if not chosen.exists():
        raise ConfigError(f"config file {chosen} does not exist")
    if not chosen.is_file():
        raise ConfigError(f"config file {chosen} is not a file")
    return chosen


def load_config(path: str | None = None) -> Config:
    """The effective configuration; ConfigError on anything wrong."""
    found = find_config_file(path)
    config = _read_file(found) if found else Config()
    if os.environ.get(ENV_URL):
        config = replace(config, database=replace(config.database, url=os.environ[ENV_URL]))
    if config.server.release is not None and config.server.release == _release_from_env():
        try:
            parse_release(config.server.release)
        except ValueError as exc:
            raise ConfigError(f"${ENV_RELEASE} (server.release): {exc}") from None
    if os.environ.get(ENV_DASHBOARD_TOKEN):
        try:
            token = parse_token(os.environ[ENV_DASHBOARD_TOKEN])
        except ValueError as exc:
            raise ConfigError(f"${ENV_DASHBOARD_TOKEN}: {exc}") from None
        config = replace(config, dashboard=replace(config.dashboard, token=token))
    return config


def _read_file(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML: the file is not UTF-8 text") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_where(path, getattr(exc, 'problem_mark', None))}: not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    sections = {}
    if root is not None:
        for name, key_node, value_node in _mapping(root, path, "the top level"):
            if name == "recurring":
                sections[name] = _read_recurring(path, value_node)
            else:
                sections[name] = _read_section(path, name, key_node, value_node)
    config = Config(source=str(path), **sections)
    _check_relations(config, path, root)
    _check_recurring(config, path, root)
    return config


def _read_recurring(path, node) -> tuple[RecurringEntry, ...]:
    """`recurring:`, a list of entries (see supervisor/recurring.py); an
    error names the entry's key and its line."""
    if _is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError(f"{_where(path, node.start_mark)}: recurring must be a list of entries "
                          f"(- name: ..., cron: ... or every: ..., target: ... or command: ...)")
    entries, lines = [], {}
    for item in node.value:
        if not isinstance(item, yaml.MappingNode):
            raise ConfigError(f"{_where(path, item.start_mark)}: each recurring entry must be a mapping of keys "
                              f"(name, cron or every, target or command, ...)")
        values, key_lines = {}, {}
        for key, k_node, v_node in _mapping(item, path, "a recurring entry", "recurring."):
            values[key] = _expand(_plain_value(path, v_node, f"recurring.{key}"), path, v_node, f"recurring.{key}")
            key_lines[key] = k_node.start_mark.line + 1
        try:
            entry = make_entry(values)
        except EntryError as exc:
            line = key_lines.get(exc.key, item.start_mark.line + 1)
            key = f"recurring.{exc.key}" if exc.key else "recurring"
            raise ConfigError(f"{path}:{line}: {key}: {exc}") from None
        if entry.name in lines:
            raise ConfigError(f"{path}:{key_lines['name']}: recurring.name: {entry.name!r} is given twice "
                              f"(first at line {lines[entry.name]})")
        lines[entry.name] = key_lines["name"]
        entries.append(entry)
    return tuple(entries)


def _check_recurring(config: Config, path, root) -> None:
    """A command entry needs command jobs: this server's jobs.allow_commands
    must not be empty. (A target or command that the allow-lists do not
    list is only warned about, as `enqueue` does: other servers may run it.)"""
    for index, entry in enumerate(config.recurring):
        if entry.command and not config.jobs.allow_commands:
            item = [v for k, v in root.value if k.value == "recurring"][0].value[index]
            line = next(k.start_mark.line + 1 for k, _ in item.value if k.value == "command")
            raise ConfigError(f"{path}:{line}: recurring.command: recurring {entry.name!r} is a command, and "
                              f"command jobs are disabled: list {entry.command[0]!r} in jobs.allow_commands")


def _where(path, mark) -> str:
    """`file:line` for error messages (YAML marks count lines from 0)."""
    return f"{path}:{mark.line + 1}" if mark else str(path)


def _mapping(node, path, what, prefix=""):
    """(key, key node, value node) of a YAML mapping; a repeated key is an
    error, because YAML would otherwise keep the last one without a word."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node.start_mark)}: {what} must be a mapping of keys")
    if node.tag != PLAIN_MAPPING:
        # `!!python/object:os.system {}` is a mapping too: refuse every tag.
        raise ConfigError(f"{_where(path, node.start_mark)}: {what}: YAML tags such as {node.tag!r} "
                          f"are refused; write plain keys and values")
    seen = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in seen:
            raise ConfigError(f"{_where(path, key_node.start_mark)}: {prefix}{key} is set twice "
                              f"(first at line {seen[key]})")
        seen[key] = key_node.start_mark.line + 1
        yield key, key_node, value_node


def _read_section(path, name, key_node, value_node):
    if name not in SCHEMA:
        raise ConfigError(_unknown(path, key_node, name, SCHEMA))
    values = {}
    if not _is_null(value_node):  # an empty section keeps every default
        for key, k_node, v_node in _mapping(value_node, path, f"section {name!r}", f"{name}."):
            dotted = f"{name}.{key}"
            if key not in SCHEMA[name]:
                raise ConfigError(_unknown(path, k_node, dotted, SCHEMA[name], prefix=name))
            raw = _expand(_plain_value(path, v_node, dotted), path, v_node, dotted)
            if raw is None:  # `key:` or `key: null` means the built-in default
                continue
            try:
                values[key] = SCHEMA[name][key](raw)
            except ValueError as exc:
                raise ConfigError(f"{_where(path, v_node.start_mark)}: {dotted}: {exc}") from None
    return SECTIONS[name](**values)


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _plain_value(path, node, key):
    """The node as plain Python data; custom tags (`!!python/...`) are refused."""
    try:
        return yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_where(path, node.start_mark)}: {key}: not a plain YAML value: "
                          f"{getattr(exc, 'problem', None) or exc}") from None


def _unknown(path, node, key, known, prefix=None) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"{_where(path, node.start_mark)}: unknown key {key!r}{hint}"


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value, path, node, key):
    """${VAR} and ${VAR:-default} in strings, from the environment."""
    if isinstance(value, list):
        return [_expand(v, path, node, key) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{_where(path, node.start_mark)}: {key}: environment variable {name} is not set "
            f"(write ${{{name}:-default}} to give a default)"
        )

    expanded = _ENV_REF.sub(substitute, value)
    # A value that was only a reference is re-read as YAML, so `${N:-4}` is 4.
    if _ENV_REF.fullmatch(value):
        try:
            return yaml.safe_load(expanded) if expanded else expanded
        except yaml.YAMLError:
            return expanded
    return expanded


def _check_relations(config: Config, path, root) -> None:
    """Rules between keys, reported at the line of the first key of each rule
    that the file sets."""
    server = config.server
    rules = [
        (server.heartbeat_interval > 0, ["server.heartbeat_interval"],
         "server.heartbeat_interval must be greater than 0"),
        (server.poll_interval > 0, ["server.poll_interval"], "server.poll_interval must be greater than 0"),
        (server.safety_poll > 0, ["server.safety_poll"], "server.safety_poll must be greater than 0"),
        (
            # A supervisor that cannot heartbeat kills its jobs' processes at
            # dead_after - heartbeat_interval/2 after its last heartbeat; the
            # next heartbeat (heartbeat_interval later) must come before that.
            server.dead_after >= 2 * server.heartbeat_interval,
            ["server.dead_after", "server.heartbeat_interval"],
            f"server.dead_after ({server.dead_after:g}s) must be at least 2 x "
            f"server.heartbeat_interval ({server.heartbeat_interval:g}s): a supervisor that "
            f"cannot heartbeat kills its jobs at dead_after - heartbeat_interval/2 after its "
            f"last heartbeat, which must leave time for the next heartbeat to renew them "
            f"(5 to 10 heartbeats is a good choice)",
        ),
    ]
    for ok, keys, message in rules:
        if not ok:
            raise ConfigError(f"{path}:{_line_of(root, keys)}: {message}")


def _line_of(root, dotted_keys: list[str]) -> int:
    """The line of the first of `dotted_keys` set in the file, else 1."""
    for dotted in dotted_keys:
        node, line = root, None
        for part in dotted.split("."):
            pairs = node.value if isinstance(node, yaml.MappingNode) else []
            match = [(k, v) for k, v in pairs if k.value == part]
            if not match:
                line = None
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        if line:
            return line
    return 1
