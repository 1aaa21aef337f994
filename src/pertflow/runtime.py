"""How pertflow runs on the machine at hand: its threads, its progress bars, other libraries quiet.

* :func:`set_threads`: the threads torch computes with (default: the cores this process may
  use, capped), so that torch does not oversubscribe a shared machine.
* :func:`torch_threads_kept`: torch's thread count restored after code that changes it behind
  torch's back (numba's OpenMP layer, which cell-eval's DE tests run on).
* :func:`progress_bar`: a tqdm bar on a terminal; where stderr is a file or a pipe (a log file,
  a batch job) the same bar as plain lines, at most one every :data:`LOG_INTERVAL` seconds
  and one at the end, so that progress reaches logs without carriage returns. Stages too short
  to need one show none.
* :func:`quiet_libraries`: while it is active, what other libraries write to stderr (cell-eval's
  and pdex's progress bars, warnings, log records) is dropped, unless ``verbose``; pertflow's
  own bars keep writing to the real stderr.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from typing import Any, Iterator, TextIO

from pertflow.errors import InputError

#: Seconds between two progress lines where stderr is not a terminal (a stage shorter than this
#: writes none).
LOG_INTERVAL = 30.0
#: Seconds before a bar appears on a terminal (a stage shorter than this shows none).
TERMINAL_DELAY = 2.0

#: The most threads :func:`set_threads` picks by itself (more rarely pays for these models).
MAX_DEFAULT_THREADS = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a batch job's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int) -> int:
    """``threads`` if it is between 1 and the cores this process may use, else an error saying so
    (more threads than cores runs many times slower, never faster)."""
    cores = available_cores()
    if threads < 1 or threads > cores:
        raise InputError(f"--threads must be between 1 and the {cores} cores this process may use, got {threads}: "
                         f"more threads than cores runs many times slower. Give at most {cores}.")
    return threads


def set_threads(threads: int | None = None) -> int:
    """Set the threads torch computes with (``pertflow ... --threads N``); returns the number set.

    ``None``: the cores available to this process, at most :data:`MAX_DEFAULT_THREADS`. Give fewer
    when other processes share the machine: torch with more threads than free cores runs many
    times slower, not faster.
    """
    import torch

    n = check_threads(threads) if threads is not None else min(available_cores(), MAX_DEFAULT_THREADS)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count when the block ends.

    numba's OpenMP threading layer (pdex's DE tests in cell-eval run on it) uses the libgomp
    torch loaded and sets its thread count to numba's (``NUMBA_NUM_THREADS``: the machine's
    cores), which is also torch's: after one evaluation a process set to ``--threads 1`` trained
    with every core, two such processes on two cores fought for them, and its timings were not
    one thread's.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_real_stderr: list[TextIO] = []  # the stderr saved by quiet_libraries (innermost last)


def real_stderr() -> TextIO:
    """The stream pertflow's own progress goes to: the terminal's stderr even while others are quieted."""
    return _real_stderr[-1] if _real_stderr else sys.stderr


class _Lines(io.TextIOBase):
    """A tqdm output stream for files and pipes: each refresh as one line, no carriage returns."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip("\n")
        if line.strip():
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True) -> Any:
    """A progress bar for one of pertflow's long stages (``update``, ``set_postfix``, ``close``).

    Parameters
    ----------
    total
        Units of work (steps, cells, perturbations).
    desc, unit
        What is done and what is counted.
    initial
        Units already done (a resumed run).
    enabled
        ``False`` gives a bar that shows nothing.
    """
    from tqdm.auto import tqdm

    stream = real_stderr()
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if terminal:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, mininterval=0.5,
                    delay=TERMINAL_DELAY, dynamic_ncols=True, disable=not enabled)
    return _log_bar_class()(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(stream),
                            mininterval=LOG_INTERVAL, delay=LOG_INTERVAL, ncols=100, ascii=True, disable=not enabled)


def _log_bar_class() -> type:
    from tqdm import tqdm

    class LogBar(tqdm):
        """tqdm as log lines: a refresh (an update, a new postfix) writes at most one line per
        ``mininterval`` seconds and none before ``delay``; ``close`` writes the last state."""

        def refresh(self, nolock: bool = False, lock_args: Any = None) -> None:
            start, last = getattr(self, "start_t", None), getattr(self, "last_print_t", None)
            if start is not None and last is not None:  # not while tqdm is still being set up
                now = time.time()
                if now < start + self.delay or now - last < self.mininterval:
                    return
            super().refresh(nolock=nolock, lock_args=lock_args)
            self.last_print_t = time.time()

    return LogBar


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)

    def isatty(self) -> bool:
        return False


_verbose_block: list[bool] = []  # non-empty inside a verbose quiet_libraries block


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Drop what other libraries write to stderr (bars, warnings, log records) unless ``verbose``.

    pertflow's own bars (:func:`progress_bar`) still reach the real stderr; its notes are
    returned with its results. ``PERTFLOW_VERBOSE=1`` has the effect of ``verbose``; inside a
    verbose block (``pertflow ... --verbose``) a nested quiet one (an API call's default) is too.
    """
    if verbose or _verbose_block or os.environ.get("PERTFLOW_VERBOSE", "") not in ("", "0"):
        _verbose_block.append(True)
        try:
            yield
        finally:
            _verbose_block.pop()
        return
    _real_stderr.append(sys.stderr)
    levels = {name: logging.getLogger(name).level for name in ("cell_eval", "pdex", "numba", "accelerate", "anndata")}
    try:
        with contextlib.redirect_stderr(_Discard()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in levels:
                logging.getLogger(name).setLevel(logging.ERROR)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _real_stderr.pop()
