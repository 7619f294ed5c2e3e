"""How the server's compute threads share the CPU: their names, their priority and their torch intra-op threads.

The event loop answers admission refusals and health checks; the engine and routing threads run the U-Nets and
the text encoder. On a busy CPU all of them compete for the same cores, and a burst of refusals would wait behind
compute. Lowering the compute threads' priority (a higher nice value, per thread on Linux) lets the event loop
preempt them: compute still gets every cycle the loop does not use.

Each compute thread also sets its own torch intra-op thread count (`Settings.threads`, or `routing_threads` for
the routing thread): with OpenMP the count belongs to the calling thread, and a thread started later begins with
whatever count was set last anywhere in the process.

And each gives its OS thread its Python name (`aptp-engine-0`, `aptp-routing`), which the OpenMP workers it starts
inherit: `top -H`, `ps -L` and /proc then say which part of the server uses the CPU (`benchmarks/serving.py` splits
the server's cores that way).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

logger = logging.getLogger("aptp.server")


def available_cpus() -> int:
    """The CPUs this process's compute may use: `OMP_NUM_THREADS` when set (as Ray sets it for an actor), else the
    CPUs the process may run on."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        pass
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PR_SET_NAME = 15  # prctl(2)
NATIVE_NAME_BYTES = 15  # Linux keeps 15 bytes of a thread's name


def settle_compute_thread(niceness: int, threads: int | None) -> None:
    """What a compute thread does first: its OS thread takes its Python name (`name_native_thread`), its priority is
    lowered by `niceness` (`lower_thread_priority`) and it keeps `threads` intra-op threads (`use_intra_op_threads`).
    In that order: the OpenMP workers it starts take its name and priority."""
    name_native_thread(threading.current_thread().name)
    lower_thread_priority(niceness)
    use_intra_op_threads(threads)


def name_native_thread(name: str) -> None:
    """Give the calling OS thread `name` (its first 15 bytes); threads it starts afterwards inherit it. On Linux
    only: elsewhere, or if the call fails, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:NATIVE_NAME_BYTES]), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME) failed")
    except (OSError, AttributeError) as error:
        logger.warning("could not name thread %s: %s", name, error)


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (0: leave it). Threads it starts afterwards (torch's
    OpenMP workers) inherit it. Where the platform has no per-thread priority, nothing changes."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()  # on Linux a thread id is a valid PRIO_PROCESS target: this thread only
    try:
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness)
    except OSError as error:
        logger.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, error)


def use_intra_op_threads(threads: int | None) -> None:
    """Give the calling thread `threads` torch intra-op threads (None: leave it as it is), for good. Per calling
    thread with OpenMP; threads started afterwards begin with the last count set anywhere, so every compute thread
    sets its own.

    torch applies the process's last count to a thread lazily, at the thread's first parallel operation (or
    `torch.get_num_threads`), even when the thread set its own count before: a thread that set 1 and ran its first
    operation after another thread set 2 ran with 2. Asking for the count first makes that lazy step happen now,
    so the count set here is the one the thread keeps."""
    if threads is not None:
        torch.get_num_threads()
        torch.set_num_threads(threads)


def on_passing_thread(work: Callable[[], T], name: str) -> T:
    """Run `work` on a thread that ends with it and return its result (or raise its error here). A thread that ran
    torch operations on several intra-op threads keeps its OpenMP workers for as long as it lives; beside the
    engine's own they would make the process hold more OpenMP threads than CPUs, where libgomp lets every worker
    sleep between operations (`server.openmp`). Loading and warming up from a long-lived thread (a Ray replica's
    actor thread) go through here."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
