"""CPU priority of the server's compute threads.

The event loop answers admission refusals and health checks; the engine and routing threads run the U-Nets and
the text encoder. On a busy CPU all of them compete for the same cores, and a burst of refusals would wait behind
compute. Lowering the compute threads' priority (a higher nice value, per thread on Linux) lets the event loop
preempt them: compute still gets every cycle the loop does not use.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("aptp.server")


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
