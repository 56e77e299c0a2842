"""Recurring jobs (issue 13): when entries tick and which ticks a server
enqueues (an injected clock), config errors naming key and line, the API,
`shiftchange recurring`, and three real supervisors on SQLite, PostgreSQL
and MariaDB enqueueing each tick exactly once."""

import json
import signal
from collections import Counter
from datetime import datetime, timezone

import pytest
import yaml
from sqlalchemy import select

from harness import read_lines, shiftchange, wait_for
from supervisor import Queue
from supervisor.config import Config, ServerConfig, load_config
from supervisor.errors import ConfigError, InvalidJob, StorageUnavailable
from supervisor.loop import Supervisor
from supervisor.jobspec import new_job
from supervisor.recurring import CATCH_UP_LIMIT, Schedule, make_entry
from supervisor.storage import Storage
from supervisor.tables import recurring_ticks

T0 = datetime(2026, 3, 28, 12, 0, tzinfo=timezone.utc).timestamp()  # a Saturday, noon UTC


def entry(**values):
    return make_entry({"name": "e", "target": "m:f", **values})


# --- when entries tick ---------------------------------------------------------------


def test_every_ticks_at_whole_multiples_since_the_epoch_the_same_on_every_server():
    every = entry(every="15m")
    assert every.next_tick(T0 + 1) == T0 + 900
    assert every.ticks(T0, T0 + 3600) == [T0 + 900, T0 + 1800, T0 + 2700, T0 + 3600]
    assert every.ticks(T0 + 3600, T0 + 3600) == []


def test_cron_reads_its_fields_in_its_time_zone_across_a_dst_change():
    utc = entry(cron="30 2 * * *")
    assert utc.next_tick(T0) == T0 + 14.5 * 3600  # 02:30 UTC on Sunday
    paris = entry(cron="30 2 * * *", tz="Europe/Paris")
    # 2026-03-29 02:30 does not exist in Paris (clocks jump 02:00 -> 03:00):
    # croniter runs it at 03:00 CEST = 01:00 UTC; on the 30th 02:30 CEST = 00:30 UTC.
    first = paris.next_tick(T0)
    assert datetime.fromtimestamp(first, timezone.utc).isoformat() == "2026-03-29T01:00:00+00:00"
    second = paris.next_tick(first)
    assert datetime.fromtimestamp(second, timezone.utc).isoformat() == "2026-03-30T00:30:00+00:00"
    assert paris.ticks(T0, second) == [first, second]
    # 2026-10-25 02:30 happens twice in Paris (clocks go back 03:00 -> 02:00):
    # it ticks at both instants, and next_tick agrees with ticks().
    autumn = datetime(2026, 10, 24, 12, tzinfo=timezone.utc).timestamp()
    walked = [paris.next_tick(autumn)]
    while len(walked) < 3:
        walked.append(paris.next_tick(walked[-1]))
    assert [datetime.fromtimestamp(t, timezone.utc).strftime("%d %H:%M") for t in walked] == [
        "25 00:30", "25 01:30", "26 01:30"]
    assert paris.ticks(autumn, walked[-1]) == walked


def test_ticks_between_two_times_keep_the_newest_when_there_are_too_many():
    minute = entry(cron="* * * * *")
    ticks = minute.ticks(T0, T0 + 7 * 86400)
    assert len(ticks) == CATCH_UP_LIMIT and ticks[-1] == T0 + 7 * 86400


# --- which ticks a server enqueues -----------------------------------------------------


def test_a_new_config_entry_starts_at_now_and_then_each_tick_is_due_once():
    schedule = Schedule()
    every = entry(every="10s")
    schedule.watch([every], {}, now=T0 + 3)
    assert schedule.due(T0 + 9.9) == [] and schedule.next_due() == T0 + 10
    assert schedule.due(T0 + 10.2) == [(every, T0 + 10)]
    schedule.done_until(T0 + 10.2)
    assert schedule.due(T0 + 10.5) == []
    # a loop that fell behind still enqueues every tick that came due while it watched
    assert schedule.due(T0 + 31) == [(every, T0 + 20), (every, T0 + 30)]


@pytest.mark.parametrize("missed, expected", [
    ("latest", [T0 + 50]),  # the newest missed tick, then the one due since
    ("skip", []),
    ("all", [T0 + 20, T0 + 30, T0 + 40, T0 + 50]),
])
def test_ticks_missed_while_no_server_ran_follow_the_missed_policy(missed, expected):
    schedule = Schedule()
    every = entry(every="10s", missed=missed)
    # the last tick any server enqueued was at T0 + 10; this server starts at T0 + 55
    schedule.watch([every], {"e": T0 + 10}, now=T0 + 55)
    assert [tick for _, tick in schedule.due(T0 + 55)] == expected
    schedule.done_until(T0 + 55)
    assert [tick for _, tick in schedule.due(T0 + 61)] == [T0 + 60]


def test_missed_all_is_capped_at_the_newest_ticks():
    schedule = Schedule()
    schedule.watch([entry(every="1s", missed="all")], {"e": T0}, now=T0 + 86400)
    due = schedule.due(T0 + 86400)
    assert len(due) == CATCH_UP_LIMIT and due[-1][1] == T0 + 86400


def test_an_api_entry_counts_its_ticks_from_when_it_was_added():
    schedule = Schedule()
    added = make_entry({"name": "e", "every": "1s", "target": "m:f"}, source="api", added_at=T0 + 0.5)
    schedule.watch([added], {}, now=T0 + 0.9)  # seen at the next heartbeat: nothing due yet
    assert schedule.due(T0 + 0.9) == []
    assert [t for _, t in schedule.due(T0 + 1.0)] == [T0 + 1]


def test_the_config_entry_wins_over_an_api_entry_of_the_same_name_and_removed_entries_stop():
    schedule = Schedule()
    config, api = entry(every="10s"), make_entry({"name": "e", "every": "1s", "target": "x:y"}, source="api",
                                                 added_at=T0)
    schedule.watch([config, api], {}, now=T0)
    assert schedule.entries == [config]
    schedule.watch([], {}, now=T0 + 1)
    assert schedule.entries == [] and schedule.next_due() is None and schedule.due(T0 + 100) == []


# --- the supervisor's part: no cost without entries, a tick retried after an outage --------


class TickStorage:
    """The two storage verbs the supervisor's recurring part calls."""

    def __init__(self):
        self.calls, self.fail = [], False

    def last_ticks(self, names):
        self.calls.append(("last_ticks", list(names)))
        return {}

    def enqueue_ticks(self, ticks, server_id):
        self.calls.append(("enqueue_ticks", [(name, tick) for name, tick, _ in ticks]))
        if self.fail:
            raise StorageUnavailable("cannot reach the database")
        return [(name, tick, 1) for name, tick, _ in ticks]


def recurring_supervisor(entries, now):
    moment = [now]
    sup = Supervisor(Config(server=ServerConfig(name="s1"), recurring=tuple(entries)), clock=lambda: moment[0])
    sup.storage, sup.server_id, sup.db_offset = TickStorage(), "s1", T0 - now  # the database is at T0
    return sup, moment


def test_a_server_without_recurring_entries_never_wakes_or_writes_for_them():
    sup, _ = recurring_supervisor([], now=100.0)
    sup.watch_recurring(())
    assert sup.storage.calls == [] and sup.next_recurring == float("inf")
    assert sup._next_wake() == sup.next_beat


def test_the_supervisor_wakes_at_the_tick_and_retries_it_after_an_outage():
    sup, moment = recurring_supervisor([entry(every="10s")], now=100.0)
    sup.watch_recurring(())
    assert sup.storage.calls == [("last_ticks", ["e"])]
    assert sup.next_recurring == 110.0  # T0 + 10 on the database clock, in the loop's clock
    moment[0] = 110.0
    sup.storage.fail = True
    sup.enqueue_recurring()
    assert sup.next_recurring == sup.next_beat  # tried again after the next heartbeat
    sup.storage.fail = False
    moment[0] = 111.0
    sup.enqueue_recurring()
    assert sup.storage.calls[-1] == ("enqueue_ticks", [("e", T0 + 10)])
    assert sup.next_recurring == 120.0


# --- config errors: key, line, exit 2 ----------------------------------------------------


def write_config(tmp_path, entries, jobs=None) -> str:
    path = tmp_path / "shiftchange.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'q.db'}"},
                                    **({"jobs": jobs} if jobs else {}), "recurring": entries}, sort_keys=False))
    return str(path)


def line_of(path, text) -> int:
    """The line of the last occurrence of `text` (the bad entry comes last)."""
    return [n for n, line in enumerate(open(path), 1) if text in line][-1]


@pytest.mark.parametrize("bad, key, says", [
    ({"cron": "61 * * * *"}, "cron", "not valid"),
    ({"cron": "* * * * * *"}, "cron", "5-field"),
    ({"cron": "* * * * *", "every": "1m"}, "every", "not both"),
    ({"every": "soon"}, "every", "not a duration"),
    ({"every": "200ms"}, "every", "at least 1s"),
    ({"every": "1m", "tz": "Mars/Olympus"}, "tz", "time zone"),
    ({"every": "1m", "missed": "some"}, "missed", "latest, skip, all"),
    ({"every": "1m", "colour": "red"}, "colour", "unknown key"),
    ({"every": "1m", "command": ["sh"]}, "command", "not both"),
    ({"every": "1m", "target": "not a target"}, "target", "target"),
])
def test_a_bad_entry_is_a_config_error_naming_its_key_and_line(tmp_path, bad, key, says):
    entries = [{"name": "fine", "every": "1m", "target": "m:f"}, {"name": "bad", "target": "m:f", **bad}]
    path = write_config(tmp_path, entries)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert f"{path}:{line_of(path, f'{key}:')}:" in str(raised.value)
    assert f"recurring.{key}" in str(raised.value) and says in str(raised.value)


def test_no_schedule_a_repeated_name_and_a_command_without_command_jobs_are_config_errors(tmp_path):
    cases = [
        ([{"name": "a", "target": "m:f"}], "either cron or every"),
        ([{"name": "a", "every": "1m", "target": "m:f"}, {"name": "a", "every": "1m", "target": "m:f"}],
         "given twice"),
        ([{"name": "a", "every": "1m", "command": ["sh", "-c", "true"]}], "command jobs are disabled"),
    ]
    for entries, says in cases:
        path = write_config(tmp_path, entries)
        with pytest.raises(ConfigError, match=says):
            load_config(path)
    ok = write_config(tmp_path, cases[2][0], jobs={"allow_commands": ["sh"]})
    assert load_config(ok).recurring[0].command == ("sh", "-c", "true")


def test_the_cli_exits_2_on_a_bad_cron(tmp_path):
    path = write_config(tmp_path, [{"name": "a", "cron": "0 25 * * *", "target": "m:f"}])
    for command in (["run"], ["recurring"], ["config", "check"]):
        done = shiftchange(*command, "--config", path, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        assert f"{path}:{line_of(path, 'cron:')}: recurring.cron" in done.stderr


# --- the API and `shiftchange recurring` ---------------------------------------------------


def test_add_and_remove_recurring_through_the_api(db_url):
    with Queue(db_url) as q:
        added = q.add_recurring("nightly", cron="0 3 * * *", target="app.tasks:report", kwargs={"full": True},
                                queue="reports", tz="Europe/Paris")
        assert added.source == "api"
        q.add_recurring("nightly", cron="0 4 * * *", target="app.tasks:report")  # replaces
        q.add_recurring("ping", every=30, command=["curl", "-fsS", "http://x"])
        listed = {e["name"]: e for e in q.recurring()}
        assert listed["nightly"]["cron"] == "0 4 * * *" and listed["nightly"]["tz"] == "UTC"
        assert listed["ping"]["command"] == ["curl", "-fsS", "http://x"] and listed["ping"]["every"] == 30
        assert listed["ping"]["next_run"].endswith(("00.000Z", "30.000Z")) and listed["ping"]["last_tick"] is None
        with pytest.raises(InvalidJob, match="cron"):
            q.add_recurring("bad", cron="every day", target="m:f")
        with pytest.raises(InvalidJob, match="either target or command"):
            q.add_recurring("bad", every="1m")
        assert q.remove_recurring("nightly") and not q.remove_recurring("nightly")
        assert [e["name"] for e in q.recurring()] == ["ping"]


def test_a_tick_is_enqueued_once_whoever_inserts_it(db_url):
    """The storage verb on its own: two servers enqueue the same ticks; the
    second finds every row and enqueues nothing."""
    with Queue(db_url) as q:
        storage = Storage(q.engine)
        spec = new_job("m:f")
        first = storage.enqueue_ticks([("e", T0, spec), ("e", T0 + 1, spec)], "server-a")
        second = storage.enqueue_ticks([("e", T0 + 1, spec), ("e", T0, spec)], "server-b")
        assert [job_id is not None for _, _, job_id in first] == [True, True]
        assert [job_id for _, _, job_id in second] == [None, None]
        job = q.get(first[1][2])
        assert (job.recurring, job.recurring_tick) == ("e", T0 + 1)
        assert job.to_dict()["recurring"] == {"name": "e", "tick": "2026-03-28T12:00:01.000Z"}
        assert storage.last_ticks(["e"]) == {"e": (T0 + 1, first[1][2])}


def test_retention_keeps_each_entry_s_newest_tick(db_url):
    """A server starting later counts missed ticks from the newest tick, so
    sweeping never removes it, however old."""
    with Queue(db_url) as q:
        storage = Storage(q.engine)
        spec = new_job("m:f")
        storage.enqueue_ticks([(name, T0 + n, spec) for name in ("a", "b") for n in range(3)], None)
        with q.engine.begin() as conn:
            conn.execute(recurring_ticks.update().values(enqueued_at=0.0))
        assert storage.sweep_ticks(keep=60) == 4
        assert sorted(_rows(storage, recurring_ticks.c.name, recurring_ticks.c.tick_at)) == [
            ("a", T0 + 2), ("b", T0 + 2)]


def test_shiftchange_recurring_lists_entries_with_next_run_and_never_writes(db_url, tmp_path):
    config = tmp_path / "shiftchange.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": db_url}, "jobs": {"allow": ["app.*"]}, "recurring": [
        {"name": "hourly", "cron": "0 * * * *", "target": "app.tasks:tidy", "queue": "low", "tz": "Asia/Tokyo"},
        {"name": "other", "every": "1h", "target": "elsewhere:f"},
    ]}))
    with Queue(db_url) as q:
        q.add_recurring("hourly", every="1m", target="app.tasks:tidy")  # shadowed by the config's
        Storage(q.engine).enqueue_ticks([("hourly", T0, new_job("app.tasks:tidy"))], None)
        job_id = q.jobs()[0].id
    done = shiftchange("recurring", "--json", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(e["name"], e["source"], e["shadowed"]) for e in listed] == [
        ("hourly", "config", False), ("other", "config", False), ("hourly", "api", True)]
    hourly = listed[0]
    assert hourly["schedule"] == "0 * * * *" and hourly["tz"] == "Asia/Tokyo" and hourly["queue"] == "low"
    assert hourly["next_run"].endswith(":00:00.000Z") and hourly["last_tick"] == "2026-03-28T12:00:00.000Z"
    assert hourly["last_job"] == job_id
    table = shiftchange("recurring", "--config", str(config), cwd=tmp_path)
    assert table.returncode == 0 and "hourly" in table.stdout and "other" in table.stdout
    assert "elsewhere:f" in table.stderr and "jobs.allow" in table.stderr  # warned, as enqueue does
    assert "--json" in shiftchange("recurring", "--help", cwd=tmp_path).stdout


# --- three real servers: exactly one job per tick --------------------------------------------

TICKS = 10


def test_three_servers_enqueue_each_tick_of_an_every_second_entry_exactly_once(db_url, supervisors, tmp_path):
    ran = tmp_path / "ran"
    settings = dict(jobs={"allow": ["featurejobs:*"], "max_attempts": 1},
                    recurring=[{"name": "each-second", "every": "1s", "target": "featurejobs:record_run",
                                "kwargs": {"path": str(ran)}}])
    with Queue(db_url) as q:
        servers = [supervisors(db_url, f"s{n}", **settings) for n in (1, 2, 3)]
        for sup in servers:
            sup.wait_registered(q)
        storage = Storage(q.engine)

        def ticks():
            with storage.engine.connect() as conn:
                return conn.execute(select(recurring_ticks).order_by(recurring_ticks.c.tick_at)).all()

        # TICKS ticks after all three serve, and every job enqueued by then has run
        first = wait_for(lambda: ticks(), timeout=30, what="a first tick")[-1].tick_at
        wait_for(lambda: len([t for t in ticks() if t.tick_at > first]) >= TICKS, timeout=60,
                 what=f"{TICKS} ticks")
        # Stop them without interrupting a run (an interrupted run runs
        # again: at least once, not a second tick): quiet servers claim
        # nothing but still take part in the ticks.
        q.quiet()
        wait_for(lambda: not q.jobs(state="processing"), what="no job running")
        for sup in servers:
            sup.send(signal.SIGTERM)
        for sup in servers:
            assert sup.wait() == 0, sup.log()
        rows = ticks()
        # A server without the entry runs what the last handoffs left.
        finisher = supervisors(db_url, "s4", jobs=settings["jobs"])
        finisher.wait_registered(q)
        wait_for(lambda: all(q.get(r.job_id).state in ("succeeded", "failed") for r in rows), timeout=20,
                 what="every tick's job to finish")
        finisher.send(signal.SIGTERM)
        assert finisher.wait() == 0
        assert len(ticks()) == len(rows)  # s4 has no such entry: it enqueued nothing
        jobs = [q.get(row.job_id) for row in rows]
        recurring_jobs = [j for j in q.jobs(limit=1000) if j.recurring == "each-second"]

    # the database: one row per tick, one second apart with no gap, each with its own job
    times = [row.tick_at for row in rows]
    assert len(times) >= TICKS + 1
    assert [b - a for a, b in zip(times, times[1:])] == [1.0] * (len(times) - 1)
    assert sorted(j.id for j in recurring_jobs) == sorted(row.job_id for row in rows)
    assert [(j.recurring, j.recurring_tick) for j in jobs] == [("each-second", t) for t in times]
    assert all(j.created_at >= j.recurring_tick - 0.05 for j in jobs)  # never early by the database clock
    # the jobs' side: each tick's job ran once (one line per run)
    lines = Counter(int(line) for line in read_lines(ran))
    per_tick = Counter(lines[row.job_id] for row in rows)
    assert per_tick == {1: len(rows)}, [(row.tick_at, lines[row.job_id]) for row in rows]
    assert all(j.state == "succeeded" and j.interruptions == 0 for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    takers = Counter(row.server_id for row in rows)
    print(f"ticks enqueued per server: {sorted(takers.values())}")


def test_an_api_entry_runs_the_newest_missed_tick_on_start_and_stops_when_removed(db_url, supervisors, tmp_path):
    """Real supervisors: s1 picks up an entry added through the API; while
    no server runs, ticks are missed; s2 starts and enqueues the newest of
    them (missed: latest) and none older; after remove_recurring, ticks stop."""
    ran = tmp_path / "ran"
    jobs = {"allow": ["featurejobs:*"], "max_attempts": 1}
    with Queue(db_url) as q:
        storage = Storage(q.engine)
        q.add_recurring("api-each-second", every="1s", target="featurejobs:record_run", kwargs={"path": str(ran)})

        def ticks():
            return sorted(t for t, in _rows(storage, recurring_ticks.c.tick_at))

        s1 = supervisors(db_url, "s1", jobs=jobs)
        s1.wait_registered(q)
        wait_for(lambda: len(ticks()) >= 2, timeout=30, what="s1 to enqueue two ticks")
        s1.send(signal.SIGTERM)
        assert s1.wait() == 0, s1.log()
        before = ticks()[-1]
        wait_for(lambda: storage.now() > before + 3.5, what="three ticks to be missed")
        s2 = supervisors(db_url, "s2", jobs=jobs, log={"format": "json"})
        s2.wait_registered(q)
        since = wait_for(lambda: next((e["since"] for e in s2.events() if e.get("event") == "recurring_watch"),
                                      None), what="s2 to watch the entry")
        wait_for(lambda: ticks()[-1] > since + 1, timeout=30, what="s2 to enqueue ticks")
        after = [t for t in ticks() if t > before]
        # the newest tick missed before s2 watched, and none older
        assert since - 1 < after[0] <= since and after[0] - before >= 3, (before, since, after)
        assert [b - a for a, b in zip(after, after[1:])] == [1.0] * (len(after) - 1)
        assert q.remove_recurring("api-each-second")
        removed = storage.now()
        wait_for(lambda: next(s.heartbeat_at for s in q.servers() if s.name == "s2") > removed + 2.0,
                 what="s2 to beat for two seconds after the removal")
        assert ticks()[-1] < removed + 1.0
        assert [e["name"] for e in q.recurring()] == []
        s2.send(signal.SIGTERM)
        assert s2.wait() == 0, s2.log()


def _rows(storage, *columns):
    with storage.engine.connect() as conn:
        return conn.execute(select(*columns)).all()
