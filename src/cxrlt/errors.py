"""One exception type for bad input, so callers can show one clear line instead of a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or configuration; the message names the file, row, column or key."""
