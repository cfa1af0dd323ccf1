"""Errors that the CLI reports as a clean one-line message instead of a traceback."""


class FraError(Exception):
    """A user-facing error: bad config, bad input file, unreachable service."""


class ConfigError(FraError, ValueError):
    """A configuration key or value is invalid."""


class CheckpointError(FraError, ValueError):
    """A checkpoint cannot be loaded (missing keys, wrong shapes, untrusted content)."""


class DataError(FraError, ValueError):
    """A dataset is missing, malformed or inconsistent."""
