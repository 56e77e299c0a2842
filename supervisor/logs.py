"""Logging to stderr, for people (text) or for machines (JSON lines).

Every record passes through a filter that masks passwords in anything that
looks like a URL, so a database URL can never leak into logs by accident.
"""

import json
import logging
import re
import sys
import time

log = logging.getLogger("shiftchange")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.I)


def mask_secrets(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


def error_line(message: str) -> str:
    """The one line every command prints on stderr for an expected error."""
    return f"shiftchange: error: {mask_secrets(message)}"


class _MaskSecrets(logging.Filter):
    def filter(self, record):
        record.msg = mask_secrets(record.getMessage())
        record.args = ()
        return True


class _Text(logging.Formatter):
    def format(self, record):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + mask_secrets(self.formatException(record.exc_info))
        return line


class _Json(logging.Formatter):
    def format(self, record):
        data = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["traceback"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


def setup_logging(format: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if format == "json" else _Text())
    handler.addFilter(_MaskSecrets())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def event(message: str, *args, level: int = logging.INFO, **fields) -> None:
    """Log `message` with structured `fields` (job, server, event...) that
    the JSON format shows as keys."""
    log.log(level, message, *args, extra={"fields": fields})


def read_events(text: str) -> list[dict]:
    """The records of a JSON-format log (log.format: json), oldest first;
    lines that are not JSON records (a traceback, a partial last line) are
    skipped. Tools read numbers from these fields, never from the prose."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def first_event(text: str, name: str) -> dict | None:
    """The first record of a JSON-format log whose `event` field is `name`."""
    return next((r for r in read_events(text) if r.get("event") == name), None)
