"""Who may act: the token, the session cookie, CSRF and Origin checks.

Reads are open (the dashboard binds 127.0.0.1 by default). Every action is a
POST that needs all three of:
- a session cookie, set by /login when the operator types the token; it
  holds an HMAC of the token, never the token, and is HttpOnly and
  SameSite=Strict;
- a `csrf` form field derived from the token, which only pages served to a
  signed-in browser carry;
- an Origin (or, failing that, Referer) header naming this dashboard: a
  page on another site cannot post here even with the cookie.
Without a configured token, or with --read-only, no action is possible.
"""

import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

SESSION_COOKIE = "shiftchange_session"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class Refused(Exception):
    """An action refused for want of a right: becomes a 403 page."""


def derive(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    return derive(token, "shiftchange dashboard session")


def csrf_value(token: str) -> str:
    return derive(token, "shiftchange dashboard csrf")


def token_matches(token: str, typed: str) -> bool:
    return hmac.compare_digest(token.encode(), typed.strip().encode())


def signed_in(request: Request, token: str | None) -> bool:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return token is not None and hmac.compare_digest(cookie, session_value(token))


def check_origin(request: Request) -> None:
    """Refuse a POST that does not come from a page of this dashboard."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if not claimed or claimed == "null":
        raise Refused("the request has no Origin header: actions must come from the dashboard's own pages")
    parts = urlsplit(claimed)
    own = request.headers.get("host", "")
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != own.lower():
        raise Refused(f"the request comes from {parts.scheme}://{parts.netloc}, not from this dashboard")


def check_action(request: Request, form, token: str | None, read_only_reason: str | None) -> None:
    """Everything an action needs (see the module docstring), or Refused."""
    if read_only_reason:
        raise Refused(f"this dashboard is read-only: {read_only_reason}")
    check_origin(request)
    if not signed_in(request, token):
        raise Refused("sign in with the dashboard token to act")
    if not hmac.compare_digest(str(form.get("csrf", "")), csrf_value(token)):
        raise Refused("the form's CSRF field is missing or wrong: reload the page and try again")


def loopback_hosts(bind_host: str) -> tuple[str, ...] | None:
    """Host headers to accept when bound to a loopback address: a DNS
    rebinding page (evil.example resolving to 127.0.0.1) sends its own
    name and is refused. None (accept any) when bound elsewhere."""
    if bind_host not in LOOPBACK_HOSTS:
        return None
    return ("127.0.0.1", "localhost", "::1", "[::1]")
