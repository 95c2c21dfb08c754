"""One exception family for errors a user can cause.

Every message says what went wrong *and* what to do. The API maps these to 4xx responses,
the CLI to exit code 2; anything else is a bug and surfaces as a 500 / traceback.
"""


class FindistilError(Exception):
    """Base class of all user-facing findistil errors."""

    exit_code = 2
    http_status = 400


class ConfigError(FindistilError):
    """A configuration key has a bad value (the message names the key)."""


class DataError(FindistilError):
    """Input records/files are unusable, or too few remain after curation."""


class ModelNotAvailable(FindistilError):
    """A model id cannot be resolved to weights on this machine."""


class JobStateError(FindistilError):
    """An operation does not fit the job's current state (cancel a finished job, ...)."""


class NotFound(FindistilError):
    """A job, workload or artefact does not exist."""

    http_status = 404


class Cancelled(FindistilError):
    """Raised inside long steps when ``should_stop()`` turned true; not an error to report."""
