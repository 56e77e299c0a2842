"""The dashboard (`shiftchange dashboard`): a thin web layer over Queue.

Each route reads through the same Queue and storage verbs as the CLI and
renders a template; no query or state rule lives here. Everything a page
uses (templates, one CSS file, one JS file) ships inside this package.
Nothing below the CLI imports this package.
"""

from supervisor.web.app import DashboardSettings, create_app

__all__ = ["DashboardSettings", "create_app"]
