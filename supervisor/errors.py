"""Errors that shiftchange reports to people, each with its exit code.

An expected error is one of these and is printed as one clear line; anything
else is a bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class ShiftchangeError(Exception):
    """Base class: a failure we can explain in one line."""

    exit_code = EXIT_FAILURE


class ConfigError(ShiftchangeError):
    """The configuration or the command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class InvalidJob(ShiftchangeError):
    """A job cannot be enqueued as given (bad target, args, queue...)."""

    exit_code = EXIT_USAGE


class InvalidFilter(ShiftchangeError):
    """A job filter (state, queue, target, text) or a queue name that
    cannot be applied."""

    exit_code = EXIT_USAGE


class StorageUnavailable(ShiftchangeError):
    """The database cannot be reached (after retries where they apply)."""


class StorageRefused(StorageUnavailable):
    """The database answered and said no for a reason that retrying does not
    fix (no such database, authentication failed, not a database file, no
    driver): commands and `run` stop at once. A running supervisor treats it
    as an outage like any other (an operator may be fixing a grant)."""


class SchemaOutOfDate(ShiftchangeError):
    """The database schema is older than this release expects, and this
    command may not (or a contract step must not implicitly) upgrade it."""


class SchemaMissing(SchemaOutOfDate):
    """The database has no shiftchange schema, and this command only reads."""


class SchemaTooNew(ShiftchangeError):
    """The schema is newer than this release and declared incompatible with
    it: this server must be upgraded (the database is fine)."""


class SchemaUpgradeFailed(ShiftchangeError):
    """Creating or upgrading the schema failed (the database was reached),
    or a contract step is blocked by live servers that still need it."""


class JobNotFound(ShiftchangeError):
    """No job has the given id."""


class UnknownServer(ShiftchangeError):
    """No server has the given name or id (a typo in a hook, say)."""


class ActionRefused(ShiftchangeError):
    """An operator action that would do harm without --force."""


class JobFailed(ShiftchangeError):
    """Queue.result(): the job failed; the message holds its error."""

    def __init__(self, job):
        self.job = job
        lines = [line for line in (job.error or "").strip().splitlines() if line.strip()]
        super().__init__(f"job {job.id} failed: {lines[-1] if lines else 'no error recorded'}")


class LeaseLost(Exception):
    """This run of the job no longer holds its lease: another server owns the
    job now (it was handed off or its server was reaped). Job code should let
    it propagate; nothing this run writes will be recorded."""


class HandOff(Exception):
    """Raised by job code to give the job back to the queue as handed off,
    after saving a checkpoint. It does not use up an attempt."""


class NotInJob(RuntimeError):
    """current_job() was called outside a running shiftchange job."""
