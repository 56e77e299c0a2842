"""The invariants, checked after a run from the database, the jobs' own
records and the process trees seen. Each check returns violations as short
strings naming the job (or process) and what is wrong."""

import re
from collections import Counter, defaultdict
from pathlib import Path

from sqlalchemy import select

from chaos.cluster import alive
from chaos.jobs import FAIL_MARK, read_records
from supervisor.dbtime import db_now
from supervisor.outcomes import RECORD_TIMEOUT_S
from supervisor.tables import events, jobs

LEASE = re.compile(r"lease (\d+)")
SHOWN = 20  # violations listed per check; the rest are counted


def load_state(engine):
    """(job rows by id, events by job id in order, the database's now)."""
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(jobs))}
        history = defaultdict(list)
        for event in conn.execute(select(events).order_by(events.c.job_id, events.c.id)):
            history[event.job_id].append(event)
        now = conn.execute(select(db_now())).scalar_one()
    return rows, history, now


def final_states(plan: dict[int, str], rows, now) -> list[str]:
    """Every job ended as designed: `failed` after its attempts when it was
    built to fail, `succeeded` otherwise; nothing processing or held."""
    out = []
    for job_id, kind in plan.items():
        row = rows.get(job_id)
        if row is None:
            out.append(f"job {job_id} ({kind}) is lost: no row")
            continue
        if row.state == "processing":
            out.append(f"job {job_id} ({kind}) left processing on server {row.server_id}")
        elif row.state in ("enqueued", "scheduled"):
            held = " and held" if row.run_at > now else ""
            out.append(f"job {job_id} ({kind}) left {row.state}{held} (run_at in {row.run_at - now:+.1f}s)")
        elif kind == "always_fail":
            if row.state != "failed" or FAIL_MARK not in (row.error or "") or row.attempts != row.max_attempts:
                out.append(f"job {job_id} (always_fail) ended {row.state} after {row.attempts} attempts: "
                           f"{(row.error or '').strip().splitlines()[-1:]}")
        elif row.state != "succeeded":
            out.append(f"job {job_id} ({kind}) ended {row.state}: {(row.error or '').strip().splitlines()[-1:]}")
    return out


def replay(job_id: int, row, history) -> list[str]:
    """Walk a job's events as the state machine allows them and compare
    with its row: every lease handed out once and in order, every outcome
    written by the server holding the current lease (so no stale write was
    applied), and one `succeeded` at most."""
    out = []
    state, lease, owner = "enqueued", 0, None
    successes = 0
    for event in history:
        kind, server = event.kind, event.server_id
        detail = event.detail or ""
        if kind in ("enqueued", "stale_write"):
            continue
        if kind == "claimed":
            lease += 1
            if state != "enqueued":
                out.append(f"job {job_id}: claimed while {state}")
            found = LEASE.search(detail)
            if found and int(found.group(1)) != lease:
                out.append(f"job {job_id}: claim handed out lease {found.group(1)}, expected {lease}")
            state, owner = "processing", server
            continue
        if state != "processing":
            out.append(f"job {job_id}: '{kind}' while {state}")
        elif server != owner:
            out.append(f"job {job_id}: '{kind}' written by server {server}, the lease belongs to {owner}")
        if kind in ("handed_off", "reaped"):
            lease += 1
            state = "enqueued"
        elif kind == "failed" and "past max_interruptions" in detail:
            lease += 1
            state = "failed"
        elif kind == "succeeded":
            successes += 1
            state = "succeeded"
        elif kind == "retry_scheduled":
            state = "enqueued"  # scheduled, then promoted without an event
        elif kind == "failed":
            state = "failed"
        else:
            out.append(f"job {job_id}: unexpected event '{kind}'")
        owner = None if state != "processing" else owner
    if successes > 1:
        out.append(f"job {job_id}: {successes} 'succeeded' events")
    if row is not None:
        if (row.state if row.state != "scheduled" else "enqueued") != state:
            out.append(f"job {job_id}: row says {row.state}, its events say {state}")
        if row.lease != lease:
            out.append(f"job {job_id}: row lease {row.lease}, its events give {lease}")
        if row.state == "succeeded":
            if successes != 1:
                out.append(f"job {job_id}: succeeded with {successes} 'succeeded' events")
            if row.checkpoint is not None:
                out.append(f"job {job_id}: succeeded but a checkpoint was written after: {row.checkpoint}")
    return out


def unexpected_failures(plan, history) -> list[str]:
    """Interruptions are not failures (invariant 6): only jobs designed to
    fail may have failed runs, and fail_first exactly one."""
    out = []
    allowed = {"fail_first": 1, "always_fail": 3}
    for job_id, kind in plan.items():
        failures = [e for e in history.get(job_id, [])
                    if e.kind == "retry_scheduled" or (e.kind == "failed" and "past max_interruptions" not in (e.detail or ""))]
        if len(failures) > allowed.get(kind, 0):
            out.append(f"job {job_id} ({kind}): {len(failures)} failed runs: "
                       + "; ".join((e.detail or "")[:200] for e in failures))
    return out


def runs(plan, rows, records: Path) -> tuple[list[str], Counter]:
    """From the jobs' own records: no run started while an earlier one was
    alive, no two recorded [start, end] intervals intersect, and every
    succeeded job has a run that returned."""
    out, counts = [], Counter()
    overlaps = read_records(records / "overlaps")
    for record in overlaps:
        out.append(f"job {record['job']}: run {record['pid']} started while {record['alive']} of an earlier run were alive")
    for job_id in plan:
        recs = read_records(records / f"job-{job_id}")
        starts = {r["pid"]: r["t"] for r in recs if r["ev"] == "start"}
        ends = {r["pid"]: (r["t"], r["how"]) for r in recs if r["ev"] == "end"}
        counts["runs"] += len(starts)
        counts["runs_killed"] += len(set(starts) - set(ends))
        counts["grandchildren"] += sum(r["ev"] == "proc" for r in recs)
        returned = sum(how == "returned" for _, how in ends.values())
        counts["jobs_returned_more_than_once"] += returned > 1
        spans = sorted((starts[pid], ends[pid][0], pid) for pid in ends if pid in starts)
        for (s1, e1, p1), (s2, e2, p2) in zip(spans, spans[1:]):
            if s2 < e1:
                out.append(f"job {job_id}: runs {p1} [{s1:.3f}, {e1:.3f}] and {p2} [{s2:.3f}, {e2:.3f}] overlap")
        row = rows.get(job_id)
        if row is not None and row.state == "succeeded" and returned == 0:
            out.append(f"job {job_id}: succeeded, but no run of it returned")
    return out, counts


# A SIGKILL of the job's own tree this soon after its code completed may
# have caught its process making the outcome's write: the one window left.
MID_COMMIT_S = 2.0


def completions(plan, history, records: Path, faults: list[dict]) -> tuple[list[str], dict]:
    """From the jobs' own records: no attempt of a job completed its code
    twice (a rerun after a reap or handoff gives the attempt back, so a
    second completion of one attempt is a run repeated after its code had
    finished). Three causes are allowed, and counted apart (docs/design.md):
    the job's tree was SIGKILLed right after its code completed (the write
    of its outcome may have died with it); the run finished after its lease
    was taken (its server was stopping, or its write was refused as stale);
    the database was down when it finished (the write could not be made,
    and the supervisor's own path applied). Anything else is a violation."""
    out = []
    counts = {"completions": 0, "completions_twice": 0,
              "completions_twice_tree_killed": 0, "completions_twice_lease_taken": 0,
              "completions_twice_db_unreachable": 0}
    for job_id in plan:
        recs = read_records(records / f"job-{job_id}")
        sup_of = {r["pid"]: r.get("sup") for r in recs if r["ev"] == "start"}
        by_attempt = defaultdict(list)
        for r in recs:
            if r["ev"] == "end" and r.get("completed"):
                by_attempt[r.get("attempt")].append(r)
        counts["completions"] += sum(len(done) for done in by_attempt.values())
        twice = [done for done in by_attempt.values() if len(done) > 1]
        if not twice:
            continue
        counts["completions_twice"] += 1
        first = twice[0][0]
        why = _why_completed_twice(first, sup_of.get(first["pid"]), history.get(job_id, []), faults)
        if why:
            counts[f"completions_twice_{why}"] += 1
        else:
            out.append(f"job {job_id}: attempt {first.get('attempt')} completed {len(twice[0])} times "
                       f"(first by pid {first['pid']} at {first['t']:.3f})")
    return out, counts


def _why_completed_twice(first: dict, sup: int | None, history, faults) -> str | None:
    for fault in faults:
        if "until" in fault and fault["t"] - RECORD_TIMEOUT_S <= first["t"] <= fault["until"]:
            return "db_unreachable"
        if fault["sup"] != sup:
            continue
        # A kill of a whole tree takes a moment (a walk of /proc under load):
        # one begun just before the completion may land during the write.
        if fault["fault"] == "kill_group" and abs(fault["t"] - first["t"]) <= MID_COMMIT_S:
            return "tree_killed"
        if fault["fault"] in ("deploy", "handoff") and fault["t"] <= first["t"]:
            return "lease_taken"  # finished after its server's handoff commit
    if any(e.kind == "stale_write" for e in history):
        return "lease_taken"
    return None


def recorded_processes(plan, records: Path) -> dict[tuple[int, float], str]:
    """Every job process and grandchild the jobs recorded."""
    found = {}
    for job_id in plan:
        for r in read_records(records / f"job-{job_id}"):
            if r.get("ct") is not None:
                found[(r["pid"], r["ct"])] = f"job {job_id}"
    return found


def survivors(processes: dict[tuple[int, float], str]) -> list[str]:
    return [f"pid {pid} ({what}) is still alive" for (pid, created), what in processes.items()
            if alive(pid, created)]


def event_counts(history) -> dict[str, int]:
    return dict(Counter(e.kind for evs in history.values() for e in evs))


def limited(violations: list[str], name: str) -> list[str]:
    """At most SHOWN violations of one check, plus how many more."""
    if len(violations) <= SHOWN:
        return violations
    return violations[:SHOWN] + [f"... and {len(violations) - SHOWN} more {name} violations"]
