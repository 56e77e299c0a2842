"""GET /metrics: Prometheus text format through prometheus_client.

A custom Collector reads the queue through bounded Queue/storage verbs
(docs/dashboard.md lists each query's cost) at most once per
`cache_seconds` however often it is scraped. Counters and the run-time
histogram count the events that happened since this dashboard started
(events_since: an id range of the primary key, as long as the activity
since the last scrape); Prometheus' rate() and increase() handle the reset
when the dashboard restarts. The metric names are a contract:
docs/dashboard.md.
"""

import threading
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from supervisor.queue import WATCHED_EVENTS, Queue
from supervisor.storage import COUNTED_STATES
from supervisor.web.views import display_state

RUN_TIME_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, float("inf"))
# Server.shown_state: the stored states, with `quiet` apart from `running`.
SERVER_DISPLAY_STATES = ("running", "quiet", "stopping", "stopped", "dead")


class ShiftchangeCollector(Collector):
    """The queue's metrics, refreshed at most once per `cache_seconds`."""

    def __init__(self, queue: Queue, cache_seconds: float = 5.0, clock=time.monotonic):
        self.queue, self.cache_seconds, self.clock = queue, cache_seconds, clock
        self.lock = threading.Lock()
        self.last_event_id = queue.storage.last_event_id()  # count from now on
        self.event_totals = dict.fromkeys(WATCHED_EVENTS, 0)
        self.run_buckets = [0] * len(RUN_TIME_BUCKETS)
        self.run_sum = 0.0
        self.read_at = None
        self.families = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self):
        with self.lock:
            if self.read_at is None or self.clock() - self.read_at >= self.cache_seconds:
                self.families = self._read()
                self.read_at = self.clock()
            return list(self.families)

    def _read(self) -> list:
        began = time.perf_counter()
        self._count_new_events()
        summaries = self.queue.queue_summaries()
        servers = self.queue.servers()
        families = [
            self._jobs(summaries), self._events(), self._oldest_due(summaries), self._paused(summaries),
            self._servers(servers), self._heartbeats(servers), self._run_times(),
        ]
        took = GaugeMetricFamily("shiftchange_metrics_read_seconds",
                                 "Time the last refresh of these metrics spent reading the database.")
        took.add_metric([], time.perf_counter() - began)
        return [*families, took]

    def _count_new_events(self) -> None:
        delta = self.queue.storage.events_since(self.last_event_id)
        self.last_event_id = delta.last_id
        for kind in WATCHED_EVENTS:
            self.event_totals[kind] += delta.counts.get(kind, 0)
        for seconds in delta.run_times:
            self.run_sum += seconds
            for i, bound in enumerate(RUN_TIME_BUCKETS):
                if seconds <= bound:
                    self.run_buckets[i] += 1
                    break

    def _jobs(self, summaries):
        family = GaugeMetricFamily("shiftchange_jobs", "Jobs in each queue and state (succeeded jobs "
                                   "are not counted: see shiftchange_job_events_total).", labels=["queue", "state"])
        for summary in summaries:
            for state in COUNTED_STATES:
                family.add_metric([summary.name, state], summary.counts.get(state, 0))
        return family

    def _events(self):
        family = CounterMetricFamily("shiftchange_job_events", "Job events by kind since the dashboard started.",
                                     labels=["kind"])
        for kind, total in self.event_totals.items():
            family.add_metric([kind], total)
        return family

    def _oldest_due(self, summaries):
        family = GaugeMetricFamily("shiftchange_oldest_due_job_age_seconds",
                                   "How long the oldest due job of each queue has waited (0: none waiting).",
                                   labels=["queue"])
        for summary in summaries:
            family.add_metric([summary.name], summary.oldest_due_age or 0.0)
        return family

    def _paused(self, summaries):
        family = GaugeMetricFamily("shiftchange_queue_paused", "1 when the queue is paused, else 0.",
                                   labels=["queue"])
        for summary in summaries:
            family.add_metric([summary.name], 1.0 if summary.paused else 0.0)
        return family

    def _servers(self, servers):
        family = GaugeMetricFamily("shiftchange_servers", "Registered servers by state (quiet: running "
                                   "but claiming nothing).", labels=["state"])
        counts = dict.fromkeys(SERVER_DISPLAY_STATES, 0)
        for server in servers:
            counts[display_state(server)] = counts.get(display_state(server), 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        return family

    def _heartbeats(self, servers):
        family = GaugeMetricFamily("shiftchange_server_heartbeat_age_seconds",
                                   "Seconds since each live server's last heartbeat.", labels=["server", "host"])
        freshest: dict[tuple[str, str], float] = {}
        for server in servers:
            if server.state in ("running", "stopping"):
                key = (server.name, server.host)
                freshest[key] = min(server.heartbeat_age, freshest.get(key, server.heartbeat_age))
        for (name, host), seconds in sorted(freshest.items()):
            family.add_metric([name, host], seconds)
        return family

    def _run_times(self):
        family = HistogramMetricFamily("shiftchange_job_run_seconds",
                                       "Run time of the final run of each job that finished (succeeded or "
                                       "failed) since the dashboard started.")
        cumulative, buckets = 0, []
        for bound, count in zip(RUN_TIME_BUCKETS, self.run_buckets):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([], buckets, self.run_sum)
        return family


def metrics_endpoint(request: Request) -> Response:
    collector: ShiftchangeCollector = request.app.state.collector
    return Response(generate_latest(collector.registry), media_type=CONTENT_TYPE_LATEST)
