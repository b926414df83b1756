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


class RewardStoppedRun(RewardError):
    """A reward source failed mid-run; the run stopped before training on it (a checkpoint of the
    last whole step written where one can be). The exit code is the failure's own: 2 for a reward
    function or model that returned something unusable, 1 for a service that failed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
