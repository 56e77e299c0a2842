"""The `shiftchange` executable (and `python -m supervisor`).

A `status` command line that uses only status's own options goes straight
to supervisor/status.py, which must start fast (issue 11: at most 0.3 s;
importing Typer alone took about 35 ms of it). Every other
command line, a status line this does not recognise included (`--help`, a
typo, an option in a form not parsed here), goes to the Typer app in
supervisor/cli.py, which parses and reports it as it always did: this only
decides who parses, never what a command line means.
"""

import os
import sys

STATUS_FLAGS = {"--json": "json_", "--all": "all_"}
CONFIG_OPTIONS = ("--config", "-c")


def main() -> None:
    options = status_options(sys.argv[1:])
    if options is None:
        from supervisor.cli import main as typer_main

        typer_main()
        return
    from supervisor.status import run_status

    exit_now(run_status(**options))


def exit_now(code: int) -> None:
    """Exit with `code` once our output is out, skipping the interpreter's
    teardown: after a read through psycopg, freeing its modules and
    libraries took about 25 ms of `status`'s 330 (docs/benchmarks.md,
    section 12). Nothing of ours is left to clean up: run_status closed
    its connection, and status writes no files."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass  # whoever read our output is gone (`status | head -1`)
    os._exit(code)


def status_options(argv: list[str]) -> dict | None:
    """run_status's arguments for `status [--json] [--all] [--config PATH]`
    in the forms Typer accepts for them (`--config=PATH`, `-c PATH`, a flag
    given twice); None for anything else."""
    if not argv or argv[0] != "status":
        return None
    options = {"config_path": None, "json_": False, "all_": False}
    words = iter(argv[1:])
    for word in words:
        if word in STATUS_FLAGS:
            options[STATUS_FLAGS[word]] = True
            continue
        if word in CONFIG_OPTIONS:
            value = next(words, None)
        elif word.startswith("--config="):
            value = word.removeprefix("--config=")
        else:
            return None
        if not value or value.startswith("-"):
            return None  # Typer says what is wrong with it
        options["config_path"] = value
    return options
