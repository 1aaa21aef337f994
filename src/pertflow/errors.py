"""The exceptions the CLI reports in one line, without a traceback.

Every :class:`InputError` message names the problem and the fix. The fix is written once, in the
command line's terms (``--overwrite``, ``--pert-col perturbation``); a Python caller reads it in
the API's (``overwrite=True``, ``pert_col=perturbation``): the CLI speaks its own terms inside
:func:`cli_terms`, everything else gets :func:`in_api_terms`. :class:`TrainingInterrupted` says
where an interrupted training run stopped and where its checkpoint is.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_speaking = {"cli": False}
#: flags that are a switch on the command line and a keyword set to a value in the API
_SWITCHES = {"overwrite": "overwrite=True", "resume": "resume=True", "verbose": "verbose=True",
             "no-baselines": "baselines=False", "shift-back": "shift_back=True"}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([^\s(,;.][^\s,;]*))?")
_WORDS = {"or", "and", "to", "with", "instead", "not", "on", "in", "for", "is", "are", "at", "the", "a", "an"}


def in_api_terms(message: str) -> str:
    """A message written for the command line, with its flags as the API's keyword arguments:
    ``--overwrite`` -> ``overwrite=True``, ``--pert-col perturbation`` -> ``pert_col=perturbation``,
    ``--set`` -> ``sets=...``, a flag without its value -> ``name=...``."""
    def keyword(match: re.Match) -> str:
        flag, value = match.group(1), match.group(2)
        rest = f" {value}" if value else ""
        if flag in _SWITCHES:
            return _SWITCHES[flag] + rest
        if flag == "set":
            return f'sets=["{value}"]' if value and value not in _WORDS else f"sets=[...]{rest}"
        name = flag.replace("-", "_")
        if value and value not in _WORDS:
            return f"{name}={value}"
        return f"{name}=...{rest}"

    # a hint marked "(CLI: ...)" and a quoted command ("pertflow train ... --genes FILE") are the
    # command line's on purpose
    parts = re.split(r"(\(CLI: [^)]*\)|pertflow [a-z]+ (?:\.\.\.|[^.;:])*)", message)
    return "".join(part if part.startswith(("(CLI: ", "pertflow ")) else _FLAG.sub(keyword, part) for part in parts)


@contextmanager
def cli_terms() -> Iterator[None]:
    """Within it, :class:`InputError` messages keep the command line's flags (the CLI's main)."""
    before, _speaking["cli"] = _speaking["cli"], True
    try:
        yield
    finally:
        _speaking["cli"] = before


class InputError(ValueError):
    """Bad input from a user: a file, a column, a key, a split, a config value."""

    def __str__(self) -> str:
        message = super().__str__()
        return message if _speaking["cli"] else in_api_terms(message)


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
