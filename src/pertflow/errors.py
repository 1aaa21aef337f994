"""The exceptions the CLI reports in one line, without a traceback.

Every :class:`InputError` message names the problem and the fix. :class:`TrainingInterrupted`
says where an interrupted training run stopped and where its checkpoint is.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from a user: a file, a column, a key, a split, a config value."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped training after a step; a checkpoint of that step was written.

    A :class:`KeyboardInterrupt`, so that code which catches ``Exception`` does not carry on
    as if training had finished.

    Attributes
    ----------
    step
        The step reached (the checkpoint's step).
    checkpoints
        The run's ``checkpoints/`` folder.
    signal_name
        ``"SIGINT"`` or ``"SIGTERM"``.
    exit_code
        The conventional exit status of a process ended by that signal (128 + its number).
    """

    def __init__(self, step: int, checkpoints: Path, signal_name: str, exit_code: int):
        super().__init__(f"{signal_name}: training stopped at step {step}; checkpoint written to {checkpoints}")
        self.step = step
        self.checkpoints = checkpoints
        self.signal_name = signal_name
        self.exit_code = exit_code
