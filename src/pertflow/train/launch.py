"""Several training processes on one machine, as ``torchrun`` starts them.

``pertflow train --processes N`` runs N copies of the training with PyTorch's own process
launcher (``torch.multiprocessing``) and the environment that ``torch.distributed`` reads
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...): accelerate then finds a distributed run, joins
the processes into a process group (gloo on CPU, NCCL on GPUs) and DDP averages the gradients.
``accelerate launch`` and ``torchrun`` set the same environment, for one machine or several.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any, Callable

from pertflow.errors import InputError, TrainingInterrupted


def world_size() -> int:
    """The processes of the distributed run this process belongs to (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank in its distributed run (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(index: int, n: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({
        "RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    try:
        fn(*args)
    except InputError as err:
        print(f"process {index}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingInterrupted as stop:
        raise SystemExit(stop.exit_code) from None
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """End a worker that finished its work: leave the process group, flush the streams and exit
    at once. An ordinary interpreter exit runs C++ destructors while gloo's threads still run,
    which now and then aborts the process ("terminate called without an active exception",
    SIGABRT) after a run that succeeded and wrote everything."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(n: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``n`` processes that form one distributed run on this machine.

    ``fn`` and ``args`` must be picklable (the processes are spawned). Ctrl-C and SIGTERM are
    left to the processes (each finishes its step, process 0 writes a checkpoint); the call
    then raises ``KeyboardInterrupt``. A process that stops on bad input raises ``InputError``.
    """
    import torch.multiprocessing as mp

    if n < 1:
        raise InputError(f"--processes must be at least 1, got {n}.")
    if world_size() > 1:
        raise InputError("--processes starts its own processes: leave it out under accelerate launch or torchrun.")
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        mp.start_processes(_worker, args=(n, _free_port(), fn, args), nprocs=n, join=True, start_method="spawn")
    except mp.ProcessExitedException as err:
        if err.exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise KeyboardInterrupt from None
        if err.exit_code == 2:
            raise InputError(f"training process {err.error_index} stopped on bad input (its message is "
                             "above).") from None
        raise RuntimeError(f"training process {err.error_index} failed with exit code {err.exit_code}.") from err
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
