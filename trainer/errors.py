"""The trainer's error for a job that cannot start or continue. Light: the scheduler imports it to tell
bad input (never retried) from a crash (retried)."""

from __future__ import annotations


class JobError(RuntimeError):
    """A job that cannot start or continue; the message says why and what to do. Running it again
    would fail the same way, so a fleet marks it failed at once instead of retrying it."""


class JobInterrupted(Exception):
    """Training was asked to stop (SIGTERM); jobs between steps wrote a checkpoint first. Not a failure:
    running the same command again resumes."""
