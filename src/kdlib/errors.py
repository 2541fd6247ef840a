"""Errors a user can fix: bad config, bad data, a model kdlib cannot distil.

They carry a one-line message naming the key, file or row at fault; the command line prints that
line alone (no traceback), while other exceptions are bugs and keep their traceback.
"""


class KdlibError(Exception):
    """Base of the user-facing errors."""


class ConfigError(KdlibError, ValueError):
    """A key, type or value of the composed config is wrong."""


class DataError(KdlibError, ValueError):
    """A dataset file, column or row cannot be used."""


class ModelError(KdlibError, RuntimeError):
    """A model or tokenizer cannot be loaded or used as configured."""


class WorkerError(KdlibError, RuntimeError):
    """A worker process failed or died; the message names it."""
