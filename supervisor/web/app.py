"""The dashboard's routes. Each reads through Queue (the same API as the
CLI), builds a plain context and renders a template; actions call the same
fenced verbs as the CLI (Queue.requeue, Queue.delete, Queue.pause, ...,
handoff.hand_off).

Live pages: a page asked for with the header `X-Shiftchange-Live: 1`
answers JSON holding the HTML of its `live_*` template blocks, which
static/dashboard.js swaps in place every few seconds: one renderer, no page
reload.
"""

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from supervisor.database import mask_url
from supervisor.errors import (
    ActionRefused,
    InvalidFilter,
    JobNotFound,
    ShiftchangeError,
    StorageUnavailable,
    UnknownServer,
)
from supervisor.handoff import hand_off
from supervisor.queue import WATCHED_EVENTS, Queue
from supervisor.records import JOB_STATES
from supervisor.jobspec import QUEUE_NAME
from supervisor.storage import COUNTED_STATES, JobFilter
from supervisor.web import security, views
from supervisor.web.metrics import ShiftchangeCollector, metrics_endpoint

HERE = Path(__file__).parent
PAGE_SIZE = 50
LIVE_HEADER = "x-shiftchange-live"
HANDOFF_TIMEOUT_S = 10.0
log = logging.getLogger("shiftchange.dashboard")


@dataclass(frozen=True)
class DashboardSettings:
    token: str | None = None  # None: read-only
    show_args: bool = True
    read_only: bool = False  # --read-only: no action even with a token
    allowed_hosts: tuple[str, ...] | None = None  # Host headers accepted; None: any
    refresh_seconds: float = 2.0  # how often live pages poll
    cache_seconds: float = 1.0  # overview reads shared by every open tab
    metrics_cache_seconds: float = 5.0  # a scrape interval: /metrics queries at most this often

    @property
    def read_only_reason(self) -> str | None:
        if self.read_only:
            return "started with --read-only"
        if self.token is None:
            return "no dashboard.token is configured"
        return None


class Cached:
    """One value shared by every request for `seconds` (so ten open tabs
    polling the overview cost the database what one does)."""

    def __init__(self, seconds: float, compute, clock=time.monotonic):
        self.seconds, self.compute, self.clock = seconds, compute, clock
        self.lock = threading.Lock()
        self.value, self.at = None, None

    def forget(self) -> None:
        """The next get() reads afresh (after an action changed something)."""
        with self.lock:
            self.at = None

    def get(self):
        with self.lock:
            if self.at is None or self.clock() - self.at >= self.seconds:
                self.value, self.at = self.compute(), self.clock()
            return self.value


def create_app(queue: Queue, settings: DashboardSettings) -> Starlette:
    """The dashboard as an ASGI app, serving `queue`."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    views.install_filters(env)
    # The macros are globals, not imports: a live block rendered on its own
    # does not run its template's top-level imports.
    macros = env.get_template("_macros.html").module
    for name in ("state", "action", "job_target", "server_link", "servers_table"):
        env.globals[name] = getattr(macros, name)
    routes = [
        Route("/", overview_page),
        Route("/jobs", jobs_page),
        Route("/jobs/requeue", requeue_matching, methods=["POST"]),
        Route("/jobs/{job_id:int}", job_page),
        Route("/jobs/{job_id:int}/requeue", requeue_job, methods=["POST"]),
        Route("/jobs/{job_id:int}/delete", delete_job, methods=["POST"]),
        Route("/servers", servers_page),
        Route("/servers/{server_id}", server_page),
        Route("/servers/{server_id}/quiet", quiet_server, methods=["POST"]),
        Route("/servers/{server_id}/handoff", handoff_server, methods=["POST"]),
        Route("/queues/pause", pause_queue, methods=["POST"]),
        Route("/queues/resume", resume_queue, methods=["POST"]),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = []
    if settings.allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts)))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: http_error,
            security.Refused: refused,
            ShiftchangeError: shiftchange_error,
            Exception: server_error,
        },
    )
    app.state.queue, app.state.settings, app.state.templates = queue, settings, env
    app.state.overview = Cached(settings.cache_seconds, lambda: overview_data(queue))
    app.state.collector = ShiftchangeCollector(queue, settings.metrics_cache_seconds)
    return app


# --- rendering -------------------------------------------------------------------


def render(request: Request, name: str, context: dict, status: int = 200) -> Response:
    """The page, or with the live header the HTML of its live_* blocks."""
    app = request.app
    settings: DashboardSettings = app.state.settings
    template = app.state.templates.get_template(name)
    can_act = settings.read_only_reason is None and security.signed_in(request, settings.token)
    context = {
        **context,
        "request": request,
        "settings": settings,
        "can_act": can_act,
        "read_only_reason": settings.read_only_reason,
        "csrf": security.csrf_value(settings.token) if can_act else "",
        "database": mask_url(app.state.queue.engine.url),
        "done": views.done_message(request.query_params),
    }
    if request.headers.get(LIVE_HEADER) == "1":
        blocks = {}
        for block, render_block in template.blocks.items():
            if block.startswith("live_"):
                blocks[block] = "".join(render_block(template.new_context(context)))
        return JSONResponse({"blocks": blocks}, status_code=status, headers=NO_STORE)
    return HTMLResponse(template.render(context), status_code=status, headers=SECURITY_HEADERS)


SECURITY_HEADERS = {
    # Everything is served from here: no inline script, nothing fetched elsewhere.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def error_page(request: Request, status: int, title: str, message: str, **extra) -> Response:
    return render(request, "error.html", {"status": status, "title": title, "message": message, **extra},
                  status=status)


# --- errors: a clear page, never a traceback ---------------------------------


async def http_error(request: Request, exc: HTTPException) -> Response:
    titles = {404: "Not found", 405: "Method not allowed"}
    message = "There is no such page." if exc.status_code == 404 else str(exc.detail)
    return error_page(request, exc.status_code, titles.get(exc.status_code, "Bad request"), message)


async def refused(request: Request, exc: security.Refused) -> Response:
    return error_page(request, 403, "Forbidden", str(exc))


async def shiftchange_error(request: Request, exc: ShiftchangeError) -> Response:
    if isinstance(exc, (JobNotFound, UnknownServer)):
        return error_page(request, 404, "Not found", str(exc))
    if isinstance(exc, InvalidFilter):
        return error_page(request, 400, "Bad filter", str(exc))
    if isinstance(exc, StorageUnavailable):
        return error_page(request, 503, "Database unavailable", str(exc))
    return error_page(request, 400, "Refused", str(exc))


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("dashboard error on %s %s", request.method, request.url.path)
    return error_page(request, 500, "Internal error",
                      "Something went wrong on our side; the dashboard's log has the details.")


# --- pages -------------------------------------------------------------------------


def overview_data(queue: Queue) -> dict:
    return {
        "servers": queue.servers(),
        "queues": queue.queue_summaries(),
        "histogram": queue.event_histogram(),
    }


def overview_page(request: Request) -> Response:
    data = request.app.state.overview.get()
    live = [s for s in data["servers"] if s.state in ("running", "stopping")]
    recent_gone = [s for s in data["servers"] if s.state not in ("running", "stopping")][:5]
    return render(request, "overview.html", {
        "page": "overview", "servers": live + recent_gone, "queues": data["queues"],
        "chart": views.chart(data["histogram"], WATCHED_EVENTS), "counted_states": COUNTED_STATES,
    })


def job_filter(params) -> JobFilter:
    return JobFilter.parse(
        state=params.get("state"), queue=params.get("queue"), target=params.get("target"),
        text=params.get("text"), server=params.get("server"),
    )


def jobs_page(request: Request) -> Response:
    params = request.query_params
    which = job_filter(params)
    settings = request.app.state.settings
    if which.text is not None and not settings.show_args:
        raise InvalidFilter("searching in arguments is off: dashboard.show_args is false")
    before = params.get("before") or None
    if before is not None and (not before.isdigit() or len(before) > 18):
        raise InvalidFilter(f"before={before!r} is not a job id")
    page = request.app.state.queue.job_page(which, before=int(before) if before else None, limit=PAGE_SIZE)
    query = which.to_dict()
    return render(request, "jobs.html", {
        "page": "jobs", "filter": which, "jobs": page.jobs, "states": JOB_STATES,
        "next_url": f"/jobs?{urlencode({**query, 'before': page.next_before})}" if page.next_before else None,
        "searched_to": page.searched_to, "names": server_names(request),
        "queues": [q.name for q in request.app.state.overview.get()["queues"]],
    })


def job_page(request: Request) -> Response:
    job = request.app.state.queue.get(request.path_params["job_id"])
    names = server_names(request)
    return render(request, "job.html", {
        "page": "jobs", "job": job, "names": names,
        "timeline": [views.timeline_entry(event, names) for event in job.events],
    })


def servers_page(request: Request) -> Response:
    return render(request, "servers.html", {"page": "servers", "servers": request.app.state.queue.servers()})


def server_page(request: Request) -> Response:
    queue = request.app.state.queue
    server = queue.server(request.path_params["server_id"])
    running = queue.job_page(JobFilter(state="processing", server=server.id), limit=PAGE_SIZE).jobs
    return render(request, "server.html", {"page": "servers", "server": server, "jobs": running})


def server_names(request: Request) -> dict[str, str]:
    return {s.id: s.name for s in request.app.state.overview.get()["servers"]}


# --- actions: POST, token + CSRF + Origin, then the same verbs as the CLI -------


async def action_form(request: Request):
    form = await request.form()
    settings = request.app.state.settings
    security.check_action(request, form, settings.token, settings.read_only_reason)
    return form


def back_to(request: Request, path: str, **done) -> RedirectResponse:
    """After an action: the page to show, fresh, with what was done."""
    request.app.state.overview.forget()
    return RedirectResponse(f"{path}?{urlencode(done)}" if done else path, status_code=303)


async def requeue_job(request: Request) -> Response:
    form = await action_form(request)
    job_id = request.path_params["job_id"]
    force = form.get("force") == "1"
    try:
        await run_sync(request.app.state.queue.requeue, job_id, force=force)
    except ActionRefused as exc:
        # Say why, and offer force only as its own explicit button.
        return render(request, "refused.html", {
            "page": "jobs", "message": str(exc), "action_path": f"/jobs/{job_id}/requeue",
            "fields": {"force": "1"}, "force_label": f"Requeue job {job_id} anyway: its code runs again",
            "back": f"/jobs/{job_id}",
        }, status=409)
    return back_to(request, f"/jobs/{job_id}", done="requeued", n=1)


async def delete_job(request: Request) -> Response:
    await action_form(request)
    job_id = request.path_params["job_id"]
    await run_sync(request.app.state.queue.delete, job_id)
    return back_to(request, "/jobs", done="deleted", id=job_id)


async def requeue_matching(request: Request) -> Response:
    form = await action_form(request)
    which = job_filter(form)
    if which.state is None and which.target is None and which.queue is None:
        raise InvalidFilter("requeueing every job needs a filter: a state, a queue or a target")
    if which.state == "processing":
        raise InvalidFilter("jobs in flight are not bulk-requeued: hand off their server instead, "
                            "or requeue them one by one")
    force = form.get("force") == "1"
    result = await run_sync(request.app.state.queue.requeue_matching, which, force=force)
    return back_to(request, "/jobs", **which.to_dict(), done="requeued", n=len(result["requeued"]),
                   refused=len(result["refused"]))


async def queue_action(request: Request, pause: bool) -> Response:
    form = await action_form(request)
    name = str(form.get("queue", ""))
    if not QUEUE_NAME.match(name):
        raise InvalidFilter(f"queue {name!r} is not a valid queue name")
    queue = request.app.state.queue
    await run_sync(queue.pause if pause else queue.resume, name)
    return back_to(request, "/", done="paused" if pause else "resumed", queue=name)


async def pause_queue(request: Request) -> Response:
    return await queue_action(request, pause=True)


async def resume_queue(request: Request) -> Response:
    return await queue_action(request, pause=False)


async def quiet_server(request: Request) -> Response:
    form = await action_form(request)
    server_id = request.path_params["server_id"]
    quiet = form.get("quiet", "1") == "1"
    queue = request.app.state.queue
    server = await run_sync(queue.server, server_id)
    await run_sync(queue.quiet, [server.id], quiet)
    return back_to(request, f"/servers/{server.id}", done="quieted" if quiet else "unquieted")


async def handoff_server(request: Request) -> Response:
    await action_form(request)
    queue = request.app.state.queue
    server = await run_sync(queue.server, request.path_params["server_id"])
    reports = await run_sync(hand_off, queue.storage, [server.id], HANDOFF_TIMEOUT_S)
    handed = sum(len(r["jobs"]) for r in reports)
    return back_to(request, f"/servers/{server.id}", done="handed_off", n=handed)


# --- signing in --------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    settings: DashboardSettings = request.app.state.settings
    if request.method == "GET":
        return render(request, "login.html", {"page": "login", "failed": False})
    security.check_origin(request)
    if settings.read_only_reason:
        raise security.Refused(f"this dashboard is read-only: {settings.read_only_reason}")
    form = await request.form()
    if not security.token_matches(settings.token, str(form.get("token", ""))):
        return render(request, "login.html", {"page": "login", "failed": True}, status=403)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(security.SESSION_COOKIE, security.session_value(settings.token),
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


async def logout(request: Request) -> Response:
    security.check_origin(request)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(security.SESSION_COOKIE)
    return response


async def run_sync(function, *args, **kwargs):
    """Storage calls block: run them on Starlette's thread pool."""
    return await run_in_threadpool(function, *args, **kwargs)
