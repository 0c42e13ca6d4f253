"""The errors rim raises on purpose, in one leaf module that every layer may import (it imports nothing of rim).

Each message names what is wrong: the config key, the file and line, or the checkpoint folder. ``rim`` (the CLI)
prints them without a traceback and exits with status 2, or with ``TrainingStopped.exit_code``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message names the key."""


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record) and what is wrong.

    ``reason`` is the kind of problem, by which skipped records are counted: ``not UTF-8``, ``not JSON``,
    ``missing field``, ``wrong type``, ``empty``, ``not a number``, ``bad format`` (or ``malformed``).
    """

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated or altered files); the message names it."""


class TrainingStopped(RuntimeError):
    """Training stopped before the end; the message says why and how to resume."""

    exit_code = 3


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite."""


class Interrupted(TrainingStopped):
    """SIGTERM or SIGINT arrived; a checkpoint of the last finished step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
