"""Errors a user can act on. Entry points print their message, not a traceback."""


class DermascanError(Exception):
    """Base class: a problem with the user's input, config or environment."""


class ConfigError(DermascanError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(DermascanError):
    """The input data is missing, malformed or inconsistent."""


class DownloadError(DermascanError):
    """A download failed or produced a file that does not check out."""
