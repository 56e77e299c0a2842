"""What a producer asks for: a job's specification, validated before it
reaches storage, and the one set of job defaults (config.py's `jobs`
section takes its defaults from here)."""

import json
import re
from dataclasses import dataclass

from supervisor.errors import InvalidJob
from supervisor.targets import check_callable_syntax

MAX_PAYLOAD_BYTES = 1 << 20  # args + kwargs, and each checkpoint
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_INTERRUPTIONS = 10
# How long a job taken back from a server of release R is left to servers
# of another release (config: server.release_window).
RELEASE_WINDOW_S = 60.0
MAX_UNIQUE_KEY = 200
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]{1,200}$")


def check_queue_name(name) -> None:
    """ValueError unless `name` is a valid queue name."""
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ValueError(f"queue name {name!r} is not valid: 1-200 of letters, digits and _ . : @ / -")


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to insert. Build it with new_job()."""

    kind: str
    target: str
    args_json: str
    kwargs_json: str
    queue: str
    priority: int
    max_attempts: int
    max_interruptions: int
    run_at: float | None  # epoch seconds, or None for "now + delay"
    delay: float
    unique_key: str | None = None  # one active job per key (see Storage.enqueue_jobs)
    timeout: float | None = None  # seconds a run may take from its claim


# One encoder for every job: json.dumps with options builds a new one per
# call, a third of the time a bulk enqueue spent validating.
_STRICT_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def to_json(value, what: str, limit: int = MAX_PAYLOAD_BYTES) -> str:
    """Strict JSON for `value`, or InvalidJob naming `what` and the problem."""
    try:
        text = _STRICT_JSON.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"{what} must be JSON-serialisable: {exc}") from None
    size = len(text.encode())
    if size > limit:
        raise InvalidJob(f"{what} is {size} bytes of JSON; the limit is {limit} bytes")
    return text


def new_job(
    target: str | None = None,
    args=(),
    kwargs=None,
    *,
    command: list[str] | None = None,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_interruptions: int = DEFAULT_MAX_INTERRUPTIONS,
    run_at: float | None = None,
    delay: float = 0.0,
    unique_key: str | None = None,
    timeout: float | None = None,
) -> NewJob:
    """Validate a job: a callable `target` or a `command` argv, never both."""
    kind, target, args = _kind_target_args(target, args, command)
    if not isinstance(args, (list, tuple)):
        raise InvalidJob(f"args must be a list, not {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise InvalidJob(f"kwargs must be an object (dict), not {type(kwargs).__name__}")
    try:
        check_queue_name(queue)
    except ValueError as exc:
        raise InvalidJob(str(exc)) from None
    if max_attempts < 1 or max_interruptions < 0:
        raise InvalidJob("max_attempts must be >= 1 and max_interruptions >= 0")
    if unique_key is not None and (not isinstance(unique_key, str) or not 1 <= len(unique_key) <= MAX_UNIQUE_KEY):
        raise InvalidJob(f"unique_key must be a string of 1 to {MAX_UNIQUE_KEY} characters, not {unique_key!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise InvalidJob(f"timeout must be a number of seconds greater than 0, not {timeout!r}")
    args_json, kwargs_json = to_json(list(args), "args"), to_json(kwargs, "kwargs")
    size = len(args_json.encode()) + len(kwargs_json.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidJob(
            f"args and kwargs are {size} bytes of JSON together; the limit is {MAX_PAYLOAD_BYTES}"
        )
    return NewJob(
        kind=kind,
        target=target,
        args_json=args_json,
        kwargs_json=kwargs_json,
        queue=queue,
        priority=int(priority),
        max_attempts=int(max_attempts),
        max_interruptions=int(max_interruptions),
        run_at=run_at,
        delay=max(0.0, float(delay)),
        unique_key=unique_key,
        timeout=None if timeout is None else float(timeout),
    )


def _kind_target_args(target, args, command):
    """("command", argv[0], argv[1:]) or ("callable", target, args)."""
    if command is None:
        try:
            check_callable_syntax(target or "")
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
        return "callable", target, args
    if target is not None:
        raise InvalidJob("give a target or a command, not both")
    if not command or not all(isinstance(part, str) for part in command) or not command[0]:
        raise InvalidJob("a command job needs a non-empty argv of strings")
    return "command", command[0], list(command[1:])
