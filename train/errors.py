"""The errors the app reports in one line (``error: ...``, exit status 2) instead of a traceback."""
from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A setting the app cannot run with; the message names the setting and what is wrong."""


class DataError(ConfigError):
    """A data file (or data setting) that cannot be trained on; the message names the file and the problem."""
