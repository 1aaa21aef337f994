"""Deterministic crash points, for the tests that kill pertflow at a chosen moment.

With ``PERTFLOW_CRASH_AT=name:n`` in the environment, the process kills itself with SIGKILL the
n-th time it reaches the point ``name`` (as a power cut or an out-of-memory killer would: no
handler runs, nothing is flushed). Without it, :func:`crash_point` does nothing. The points:
``train-step`` (after an optimizer step), ``checkpoint-write`` (inside a checkpoint write, its
weights written and its state not yet), ``validation`` (inside a validation) and ``predict`` (while
a split's test cells are predicted).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PERTFLOW_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Kill this process if ``PERTFLOW_CRASH_AT`` names this point and this is its n-th pass."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
