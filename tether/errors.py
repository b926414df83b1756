"""The root of every error tether explains to a user in one paragraph.

The command line prints such an error without a traceback (unless --debug) and exits with its
`exit_code`: 2 for input that cannot be used, 1 for a run that failed, 128 + N for a run stopped
by signal N after writing a checkpoint. Each module defines its own subclasses next to the code
that raises them (ConfigError in config/, DataError in data.py, ...); the errors two modules raise
live here.
"""

from __future__ import annotations


class TetherError(Exception):
    exit_code = 2


class NumericalError(TetherError):
    """Training produced non-finite numbers too often to continue; a checkpoint was written."""

    exit_code = 1


class TrainingInterrupted(TetherError):
    """A signal (Ctrl-C, SIGTERM) stopped the run after a checkpoint was written."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class RewardError(TetherError, RuntimeError):
    """A reward source (function, model, judge) that cannot be loaded or returned something unusable."""
