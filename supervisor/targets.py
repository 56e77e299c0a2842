"""What a job may run: target syntax, the allow-list, and resolving a target.

The supervisor only ever matches strings here; importing happens in the job's
own process, and only after the same allow-list check passes there too.
"""

import fnmatch
import importlib
import os
import re
import sys
import shutil
import types
from dataclasses import dataclass

# module.path:function or module.path:Class.method; no private or dunder
# segments, so an allowed module cannot be used to reach its internals.
_SEGMENT = r"[A-Za-z][A-Za-z0-9_]*"
CALLABLE_TARGET = re.compile(rf"^{_SEGMENT}(\.{_SEGMENT})*:{_SEGMENT}(\.{_SEGMENT})*$")


class TargetRefused(Exception):
    """The target may not run here; the message says which setting decides."""


def check_callable_syntax(target: str) -> None:
    """Raise ValueError unless `target` reads `package.module:function`."""
    if not target:
        raise ValueError("the job target is empty; expected 'package.module:function'")
    if not CALLABLE_TARGET.match(target):
        raise ValueError(
            f"job target {target!r} is not 'package.module:function' "
            "(letters, digits and underscores; no segment may start with '_')"
        )


@dataclass(frozen=True)
class AllowList:
    """`jobs.allow` glob patterns and `jobs.allow_commands` executables."""

    patterns: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()

    def check_callable(self, target: str) -> None:
        try:
            check_callable_syntax(target)
        except ValueError as exc:
            raise TargetRefused(str(exc)) from None
        if not any(fnmatch.fnmatchcase(target, pattern) for pattern in self.patterns):
            shown = ", ".join(self.patterns) or "none"
            raise TargetRefused(
                f"target {target} is not allowed by jobs.allow (patterns: {shown})"
            )

    def check_command(self, executable: str) -> str:
        """The path to execute, or TargetRefused. Entries match argv[0] exactly."""
        if not self.commands:
            raise TargetRefused(
                "command jobs are disabled: list the executables in jobs.allow_commands"
            )
        if executable not in self.commands:
            raise TargetRefused(
                f"command {executable!r} is not in jobs.allow_commands "
                f"({', '.join(self.commands)})"
            )
        path = shutil.which(executable)
        if path is None:
            raise TargetRefused(f"command {executable!r} was not found on PATH")
        return path


def resolve_callable(target: str):
    """Import the module and walk to the callable. Call only after the
    allow-list check. Attribute steps may not pass through a module, so an
    allowed `tasks:os.system` cannot reach `os.system` via `import os`."""
    module_name, _, attr_path = target.partition(":")
    obj = importlib.import_module(module_name)
    for name in attr_path.split("."):
        obj = getattr(obj, name)
        if isinstance(obj, types.ModuleType):
            raise TargetRefused(f"target {target} names a module, not a function")
    if not callable(obj):
        raise TargetRefused(f"target {target} is not callable")
    return obj


def job_import_path(configured=(), cwd: str | None = None) -> tuple[str, ...]:
    """Where job processes import targets from: the server's working
    directory first (as Celery and RQ do: `shiftchange run` started in a
    project directory finds `myapp.tasks`, although a console script's own
    sys.path lacks it), then jobs.path, relative entries taken from that
    directory. Computed once, at the server's start."""
    base = os.path.abspath(cwd or os.getcwd())
    return tuple(dict.fromkeys([base, *(os.path.join(base, p) for p in configured)]))


def extend_import_path(directories) -> None:
    """Put `directories` first on sys.path (in a job's own process)."""
    sys.path[:0] = [d for d in directories if d not in sys.path]
