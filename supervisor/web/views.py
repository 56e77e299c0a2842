"""Presentation only: words and numbers as the pages show them (ages,
times, the event timeline, the chart's geometry). No queries, no rules."""

from dataclasses import dataclass
from datetime import datetime, timezone

from supervisor.records import Event, Server

# How each event reads in a job's timeline; {server} is the server's name.
EVENT_WORDS = {
    "enqueued": "enqueued",
    "claimed": "claimed by {server}",
    "succeeded": "succeeded on {server}",
    "failed": "failed on {server}",
    "retry_scheduled": "run failed on {server}; retry scheduled",
    "handed_off": "handed off by {server}",
    "reaped": "reaped from {server}",
    "requeued": "requeued",
    "stale_write": "stale write refused from {server}",
}
DONE = {
    "requeued": "Requeued {n} job(s).",
    "deleted": "Deleted job {id}.",
    "paused": "Paused queue {queue}: its jobs stay enqueued until it is resumed.",
    "resumed": "Resumed queue {queue}.",
    "quieted": "The server is quiet: it finishes its jobs and claims no new ones.",
    "unquieted": "The server claims jobs again.",
    "handed_off": "Handed off: {n} job(s) went back to the queue.",
}
CHART_WIDTH, CHART_HEIGHT = 600, 120


def age(seconds: float | None) -> str:
    """3.2s, 4m 10s, 2h 5m, 3d 4h."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def display_state(server: Server) -> str:
    """Server.shown_state: `quiet` for a running server that claims nothing."""
    return server.shown_state


def install_filters(env) -> None:
    env.filters.update(age=age, when=when, server_state=display_state)


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    kind: str
    before: str  # the words before the server's name
    server_id: str | None
    server_name: str | None
    after: str  # the words after it
    detail: str | None


def timeline_entry(event: Event, names: dict[str, str]) -> TimelineEntry:
    words = EVENT_WORDS.get(event.kind, event.kind.replace("_", " "))
    if event.server is None:  # an operator's action, or a server since forgotten
        for joint in (" by {server}", " on {server}", " from {server}"):
            words = words.replace(joint, "")
    before, _, after = words.partition("{server}")
    name = names.get(event.server, event.server[:8]) if event.server else None
    return TimelineEntry(event.at, event.kind, before, event.server, name, after, event.detail)


def done_message(params) -> str | None:
    """The banner after an action redirected here (fixed sentences: the
    URL picks one and fills in numbers or names, never free text)."""
    template = DONE.get(params.get("done", ""))
    if template is None:
        return None
    values = {key: params.get(key, "") for key in ("n", "id", "queue")}
    message = template.format(**values)
    refused = params.get("refused", "0")
    if refused.isdigit() and int(refused):
        message += (f" {refused} job(s) that succeeded already were left alone: "
                    "tick 'also succeeded jobs' to run them again.")
    return message


@dataclass(frozen=True)
class Bar:
    kind: str
    x: float
    y: float
    width: float
    height: float
    count: int


def chart(histogram, kinds) -> dict:
    """Stacked bars, one per time bucket, as SVG rectangles."""
    buckets = len(next(iter(histogram.counts.values()), []))
    totals = [sum(histogram.counts[k][i] for k in kinds) for i in range(buckets)]
    peak = max(totals, default=0) or 1
    width = CHART_WIDTH / max(buckets, 1)
    bars = []
    for i in range(buckets):
        y = CHART_HEIGHT
        for kind in kinds:
            count = histogram.counts[kind][i]
            if count:
                height = CHART_HEIGHT * count / peak
                y -= height
                bars.append(Bar(kind, i * width + 1, y, max(width - 2, 1), height, count))
    return {
        "bars": bars, "width": CHART_WIDTH, "height": CHART_HEIGHT, "peak": peak,
        "totals": {kind: sum(histogram.counts[kind]) for kind in kinds},
        "minutes": round(histogram.width * buckets / 60),
    }
