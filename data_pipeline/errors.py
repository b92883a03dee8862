"""The one error type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be trained on. The message names the file, the line or row, the field, the value,
    the fields that exist, and the fix."""
