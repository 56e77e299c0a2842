"""The dashboard through Starlette's test client, on real SQLite, PostgreSQL
and MariaDB queues: every page and every asset it references, the 4xx
pages, the token / CSRF / Origin rules, read-only mode, show_args, the
actions (through the same verbs as the CLI) and /metrics as Prometheus
parses it. The browser tests are in test_dashboard_browser.py."""

import re
from html.parser import HTMLParser

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from supervisor import Queue
from supervisor.storage import JobFilter, SCAN_WINDOW
from supervisor.web import DashboardSettings, create_app
from supervisor.web.security import csrf_value

TOKEN = "test-token-0123456789abcdef"
ORIGIN = "http://127.0.0.1:8642"
SECRET_ARG = "private-person@example.org"


class Links(HTMLParser):
    """Every href and src of a page, and every form with its fields."""

    def __init__(self):
        super().__init__()
        self.urls, self.forms = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("href", "src"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if tag == "form":
            self.forms.append({"action": attrs.get("action"), "method": attrs.get("method", "get"), "fields": {}})
        if tag == "input" and self.forms and attrs.get("name"):
            self.forms[-1]["fields"][attrs["name"]] = attrs.get("value", "")


def parse(html: str) -> Links:
    links = Links()
    links.feed(html)
    return links


def seed(q: Queue) -> dict:
    """A server that ran jobs: one succeeded, two failed (one target), one
    running, some waiting in two queues."""
    storage = q.storage
    server = storage.register_server(name="worker-1", host="elsewhere", pid=4242, pid_started_at=1.0,
                                     queues=["default", "mail"], concurrency=4, dead_after=30.0)
    ok = q.enqueue("app.tasks:ok", [1, SECRET_ARG]).id
    bad = [q.enqueue("app.tasks:bad", [n]).id for n in range(2)]
    other_bad = q.enqueue("app.tasks:other", [9]).id
    running = q.enqueue("app.tasks:long", [3]).id
    claimed = {job.id: job for job in storage.claim(server, ["default"], limit=10)}
    storage.complete(ok, claimed[ok].lease, server)
    for job_id in [*bad, other_bad]:
        storage.fail(job_id, claimed[job_id].lease, server, "Traceback (most recent call last):\n"
                     "  File \"x.py\", line 1\nValueError: <b>bad input</b>", retry_backoff=0, retry=False)
    waiting = [q.enqueue("app.tasks:later", [n], queue="mail").id for n in range(3)]
    return {"server": server, "ok": ok, "bad": bad, "other_bad": other_bad, "running": running, "waiting": waiting}


def client_for(q, **settings) -> TestClient:
    values = dict(token=TOKEN, allowed_hosts=("127.0.0.1", "localhost"), cache_seconds=0, metrics_cache_seconds=0)
    values.update(settings)
    return TestClient(create_app(q, DashboardSettings(**values)), base_url=ORIGIN, raise_server_exceptions=False)


@pytest.fixture
def dash(db_url):
    with Queue(db_url) as q:
        made = seed(q)
        yield q, client_for(q), made


def sign_in(client: TestClient) -> None:
    response = client.post("/login", data={"token": TOKEN}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and "shiftchange_session" in response.headers["set-cookie"]
    assert "httponly" in response.headers["set-cookie"].lower()
    assert "samesite=strict" in response.headers["set-cookie"].lower()


def act(client, path, origin=ORIGIN, csrf=True, **fields):
    data = {"csrf": csrf_value(TOKEN)} if csrf else {}
    data.update(fields)
    headers = {"Origin": origin} if origin else {}
    return client.post(path, data=data, headers=headers, follow_redirects=False)


def pages(made) -> list[str]:
    return ["/", "/jobs", "/jobs?state=failed", f"/jobs/{made['ok']}", f"/jobs/{made['bad'][0]}",
            f"/jobs/{made['running']}", "/servers", f"/servers/{made['server']}", "/login"]


# --- pages and assets -------------------------------------------------------------------


def test_every_page_and_every_asset_and_link_it_references_answers_200(dash):
    q, client, made = dash
    sign_in(client)
    referenced = set()
    for path in pages(made):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert 'File "/' not in response.text  # no traceback of ours
        referenced.update(url for url in parse(response.text).urls if url.startswith("/"))
    assert {"/static/dashboard.css", "/static/dashboard.js", "/static/favicon.svg"} <= referenced
    for url in sorted(referenced):
        assert client.get(url).status_code == 200, url
    assert not [url for url in referenced if "//" in url], "nothing is fetched from elsewhere"


def test_the_pages_show_what_storage_holds(dash):
    q, client, made = dash
    overview = client.get("/").text
    assert "worker-1" in overview and "elsewhere" in overview
    assert 'data-queue="mail"' in overview and 'data-queue="default"' in overview
    default_row = re.search(r'data-queue="default">(.*?)</tr>', overview, re.S).group(1)
    assert ">3</a>" in default_row  # three failed jobs, linked to their list
    failed = client.get("/jobs?state=failed").text
    assert all(f'data-job="{job_id}"' in failed for job_id in [*made["bad"], made["other_bad"]])
    assert f'data-job="{made["ok"]}"' not in failed
    by_target = client.get("/jobs?target=app.tasks:bad").text
    assert sorted(map(int, re.findall(r'data-job="(\d+)"', by_target))) == sorted(made["bad"])
    job = client.get(f"/jobs/{made['bad'][0]}").text
    # The error is shown whole and escaped; the timeline names the server.
    assert "ValueError: &lt;b&gt;bad input&lt;/b&gt;" in job and "<b>bad input</b>" not in job
    assert re.search(r"claimed by <a href=\"/servers/\w+\">worker-1</a>", job)
    assert re.search(r"failed on <a href=\"/servers/\w+\">worker-1</a>", job)
    server = client.get(f"/servers/{made['server']}").text
    assert f'data-job="{made["running"]}"' in server
    # The chart's data: this minute's bucket holds what just happened.
    chart = q.event_histogram(span=3600, buckets=60)
    assert chart.counts["failed"][-1] == 3 and sum(chart.counts["failed"]) == 3
    assert chart.counts["succeeded"][-1] == 1 and sum(chart.counts["handed_off"]) == 0
    assert 'id="total-failed">3<' in overview


def test_text_search_and_pagination_are_bounded_and_continue(dash):
    q, client, made = dash
    ids = [q.enqueue("app.tasks:page", [n, f"needle-{n}"]).id for n in range(60)]
    first = client.get("/jobs?target=app.tasks:page")
    assert sorted(map(int, re.findall(r'data-job="(\d+)"', first.text)), reverse=True) == ids[::-1][:50]
    older = re.search(r'href="(/jobs\?[^"]*before=\d+[^"]*)"', first.text).group(1).replace("&amp;", "&")
    second = client.get(older).text
    assert sorted(map(int, re.findall(r'data-job="(\d+)"', second)), reverse=True) == ids[::-1][50:]
    found = client.get("/jobs", params={"text": "needle-7"}).text
    assert sorted(map(int, re.findall(r'data-job="(\d+)"', found))) == [ids[7]]
    # A percent sign is a character, not a wildcard.
    assert 'data-job="' not in client.get("/jobs", params={"text": "needle-%"}).text
    # Past the window, a search stops, says where, and goes on from there.
    top = ids[-1] + SCAN_WINDOW + 1
    page = q.job_page(JobFilter(target="app.tasks:page"), before=top, limit=10)
    assert page.jobs == [] and page.searched_to == ids[-1] + 1 == page.next_before
    assert len(q.job_page(JobFilter(target="app.tasks:page"), before=page.next_before, limit=100).jobs) == 60


def test_live_requests_get_the_live_blocks_as_json(dash):
    q, client, made = dash
    response = client.get("/", headers={"X-Shiftchange-Live": "1"})
    blocks = response.json()["blocks"]
    assert set(blocks) == {"live_servers", "live_queues", "live_chart"}
    assert "worker-1" in blocks["live_servers"]
    job = client.get(f"/jobs/{made['running']}", headers={"X-Shiftchange-Live": "1"}).json()["blocks"]
    assert "processing" in job["live_state"]


# --- bad requests: a clear 4xx page, never a traceback ------------------------------------


@pytest.mark.parametrize("path, status, words", [
    ("/jobs/987654", 404, "no job with id 987654"),
    ("/jobs/not-a-number", 404, "no such page"),
    ("/jobs?state=bogus", 400, "state 'bogus' is not one of"),
    ("/jobs?before=12abc", 400, "is not a job id"),
    ("/jobs?queue=bad%20name", 400, "is not a valid queue name"),
    ("/servers/nobody", 404, "no server is named nobody"),
    ("/nowhere", 404, "no such page"),
])
def test_bad_requests_get_a_clear_4xx_page(dash, path, status, words):
    q, client, made = dash
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert words.replace("'", "&#39;") in response.text and 'File "/' not in response.text


def test_a_foreign_host_header_is_refused(dash):
    """DNS rebinding: a page of evil.example resolving to 127.0.0.1."""
    q, client, made = dash
    assert client.get("/", headers={"Host": "evil.example:8642"}).status_code == 400


# --- who may act ---------------------------------------------------------------------------


def test_actions_need_the_token_csrf_and_our_origin(dash):
    q, client, made = dash
    job_id = made["bad"][0]
    assert act(client, f"/jobs/{job_id}/requeue").status_code == 403  # not signed in
    sign_in(client)
    refused = [
        act(client, f"/jobs/{job_id}/requeue", csrf=False),
        act(client, f"/jobs/{job_id}/requeue", origin="http://evil.example"),
        act(client, f"/jobs/{job_id}/requeue", origin=None),
        act(client, f"/jobs/{job_id}/requeue", origin="http://127.0.0.1:9999"),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403, 403]
    assert "CSRF" in refused[0].text and "evil.example" in refused[1].text and "Origin" in refused[2].text
    assert q.get(job_id).state == "failed"
    done = act(client, f"/jobs/{job_id}/requeue")
    assert done.status_code == 303 and q.get(job_id).state == "enqueued"
    assert "Requeued 1 job" in client.get(done.headers["location"]).text


def test_a_wrong_token_does_not_sign_in(dash):
    q, client, made = dash
    response = client.post("/login", data={"token": "not-the-token-at-all"}, headers={"Origin": ORIGIN})
    assert response.status_code == 403 and "shiftchange_session" not in response.headers.get("set-cookie", "")
    assert client.post("/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}).status_code == 403


def test_pages_offer_actions_only_to_a_signed_in_browser(dash):
    q, client, made = dash
    assert "/requeue" not in client.get(f"/jobs/{made['bad'][0]}").text
    sign_in(client)
    forms = parse(client.get(f"/jobs/{made['bad'][0]}").text).forms
    requeue = [f for f in forms if f["action"] == f"/jobs/{made['bad'][0]}/requeue"]
    assert requeue and requeue[0]["method"] == "post" and requeue[0]["fields"]["csrf"] == csrf_value(TOKEN)


@pytest.mark.parametrize("settings", [{"token": None}, {"read_only": True}])
def test_read_only_dashboards_refuse_every_action(db_url, settings):
    with Queue(db_url) as q:
        made = seed(q)
        client = client_for(q, **settings)
        login = client.post("/login", data={"token": TOKEN}, headers={"Origin": ORIGIN})
        assert login.status_code == 403 and "read-only" in login.text
        client.cookies.set("shiftchange_session", "anything")
        for path, fields in [(f"/jobs/{made['bad'][0]}/requeue", {}), (f"/jobs/{made['ok']}/delete", {}),
                             ("/queues/pause", {"queue": "default"}), (f"/servers/{made['server']}/handoff", {})]:
            response = act(client, path, **fields)
            assert response.status_code == 403 and "read-only" in response.text, path
        assert q.get(made["bad"][0]).state == "failed" and q.paused_queues() == set()
        assert "read-only" in client.get("/").text and "<form method=\"post\"" not in client.get("/").text


def test_show_args_false_hides_arguments(db_url):
    with Queue(db_url) as q:
        made = seed(q)
        client = client_for(q, show_args=False)
        for path in pages(made):
            assert SECRET_ARG not in client.get(path).text, path
        assert "hidden (dashboard.show_args is false)" in client.get(f"/jobs/{made['ok']}").text
        assert client.get("/jobs", params={"text": "private"}).status_code == 400
        assert SECRET_ARG in client_for(q).get(f"/jobs/{made['ok']}").text  # shown by default


def test_no_page_shows_the_database_password(postgres_url):
    # The local PostgreSQL trusts 127.0.0.1, so any password connects.
    with_password = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    with Queue(with_password) as q:
        seed(q)
        client = client_for(q)
        sign_in(client)
        for path in ["/", "/jobs", "/servers", "/metrics", "/jobs/987654", "/login"]:
            text = client.get(path).text
            assert "s3cret-pw" not in text, path
        assert "postgres:***@" in client.get("/").text


# --- actions: the same verbs as the CLI ---------------------------------------------------


def test_requeue_of_a_succeeded_job_is_refused_and_forcing_it_is_its_own_button(dash):
    q, client, made = dash
    sign_in(client)
    response = act(client, f"/jobs/{made['ok']}/requeue")
    assert response.status_code == 409 and "succeeded already" in response.text
    (force,) = [f for f in parse(response.text).forms if f["fields"].get("force") == "1"]
    assert q.get(made["ok"]).state == "succeeded"
    forced = act(client, force["action"], force="1")
    assert forced.status_code == 303 and q.get(made["ok"]).state == "enqueued"


def test_requeue_every_failed_job_of_one_target(dash):
    q, client, made = dash
    sign_in(client)
    response = act(client, "/jobs/requeue", state="failed", target="app.tasks:bad")
    assert response.status_code == 303
    assert [q.get(job_id).state for job_id in made["bad"]] == ["enqueued", "enqueued"]
    assert q.get(made["other_bad"]).state == "failed"
    assert act(client, "/jobs/requeue").status_code == 400  # no filter: refused
    # Succeeded jobs in a match are left alone unless forced, and the page says so.
    mixed = act(client, "/jobs/requeue", queue="default", state="succeeded")
    assert "1 job(s) that succeeded already were left alone" in client.get(mixed.headers["location"]).text
    assert q.get(made["ok"]).state == "succeeded"


def test_delete_a_job(dash):
    q, client, made = dash
    sign_in(client)
    assert act(client, f"/jobs/{made['other_bad']}/delete").status_code == 303
    assert client.get(f"/jobs/{made['other_bad']}").status_code == 404


def test_pause_and_resume_a_queue(dash):
    q, _, made = dash
    # Reads are shared for an hour here: an action must still show its effect.
    client = client_for(q, cache_seconds=3600)
    client.get("/")
    sign_in(client)
    assert act(client, "/queues/pause", queue="mail").status_code == 303
    assert q.paused_queues() == {"mail"}
    row = re.search(r'data-queue="mail">(.*?)</tr>', client.get("/").text, re.S).group(1)
    assert "paused" in row and "Resume" in row
    assert act(client, "/queues/pause", queue="no such queue").status_code == 400
    assert act(client, "/queues/resume", queue="mail").status_code == 303 and q.paused_queues() == set()


def test_quiet_and_hand_off_a_server(dash):
    q, client, made = dash
    sign_in(client)
    server = made["server"]
    assert act(client, f"/servers/{server}/quiet", quiet="1").status_code == 303
    assert q.server(server).quiet and "quiet" in client.get(f"/servers/{server}").text
    assert act(client, f"/servers/{server}/quiet", quiet="0").status_code == 303 and not q.server(server).quiet
    assert act(client, f"/servers/{server}/handoff").status_code == 303
    assert q.server(server).state == "stopping" and q.get(made["running"]).state == "enqueued"


# --- metrics ---------------------------------------------------------------------------------


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(family, **labels) -> float:
    (sample,) = [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())
                 and s.name == family.name + ("_total" if family.type == "counter" else "")]
    return sample.value


def test_metrics_parse_and_carry_the_documented_names(dash):
    q, client, made = dash
    families = scrape(client)
    assert {
        "shiftchange_jobs", "shiftchange_job_events", "shiftchange_oldest_due_job_age_seconds",
        "shiftchange_queue_paused", "shiftchange_servers", "shiftchange_server_heartbeat_age_seconds",
        "shiftchange_job_run_seconds", "shiftchange_metrics_read_seconds",
    } == set(families)
    assert families["shiftchange_job_events"].type == "counter"
    assert families["shiftchange_job_run_seconds"].type == "histogram"
    assert value(families["shiftchange_jobs"], queue="default", state="failed") == 3
    assert value(families["shiftchange_jobs"], queue="mail", state="enqueued") == 3
    assert value(families["shiftchange_jobs"], queue="default", state="processing") == 1
    assert value(families["shiftchange_servers"], state="running") == 1
    assert value(families["shiftchange_oldest_due_job_age_seconds"], queue="mail") >= 0
    assert value(families["shiftchange_server_heartbeat_age_seconds"], server="worker-1", host="elsewhere") >= 0

    # Counters count what happens after the dashboard started.
    assert value(families["shiftchange_job_events"], kind="succeeded") == 0
    (job,) = q.storage.claim(made["server"], ["mail"], limit=1)
    q.storage.complete(job.id, job.lease, made["server"])
    q.pause("mail")
    families = scrape(client)
    assert value(families["shiftchange_job_events"], kind="succeeded") == 1
    (count,) = [s.value for s in families["shiftchange_job_run_seconds"].samples if s.name.endswith("_count")]
    assert count == 1
    assert value(families["shiftchange_queue_paused"], queue="mail") == 1


def test_metrics_are_cached_for_a_scrape_interval(dash):
    q, _, made = dash
    client = client_for(q, metrics_cache_seconds=3600)
    before = value(scrape(client)["shiftchange_jobs"], queue="mail", state="enqueued")
    q.enqueue("app.tasks:later", queue="mail")
    assert value(scrape(client)["shiftchange_jobs"], queue="mail", state="enqueued") == before


# --- the command and the layering ------------------------------------------------------------


def test_the_dashboard_command_has_its_options():
    from typer.testing import CliRunner

    from supervisor.cli import app

    help_text = CliRunner().invoke(app, ["dashboard", "--help"], env={"COLUMNS": "200"}).stdout
    for option in ("--config", "--host", "--port", "--read-only", "127.0.0.1", "8642"):
        assert option in help_text


def test_nothing_below_the_cli_imports_the_web_layer():
    import subprocess
    import sys

    code = ("import sys, supervisor, supervisor.loop, supervisor.queue, supervisor.storage, supervisor.handoff; "
            "print([m for m in sys.modules if m.startswith(('supervisor.web', 'starlette', 'uvicorn', 'prometheus'))])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
