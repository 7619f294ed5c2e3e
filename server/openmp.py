"""How OpenMP's worker threads wait for the next operation while the server runs, set before torch is imported
(OpenMP reads it once, when torch loads it). This module imports nothing heavy, so that it can run first.

Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) costs a wake-up per operation: at saturation the server ran at 0.5-0.6 of
its offline throughput, its 2 compute threads using 1.3 cores. `ACTIVE` with a spin count of 100,000 (about 0.1 ms)
keeps the workers awake between the operations of a U-Net call and still lets them sleep between batches (an idle
process stays idle: tests/server/test_openmp.py). Beside other busy processes on the same cores PASSIVE is the safer
choice (spinning made a 2-thread teacher call several times slower there); `benchmarks/serving.py` measures both.

The spin count holds only while the process has no more OpenMP threads than CPUs. Past that libgomp spins 1,000
times at most (100 without a policy) before sleeping, whatever GOMP_SPINCOUNT says (GCC's libgomp manual), and every
thread that runs torch operations with more than one intra-op thread brings workers of its own. With the engine on
2 threads and the routing thread on 2 as well, the server kept 1.5-1.6 of the 2 cores busy at saturation; with one
routing thread (`Settings.routing_threads`, default 1) it kept 1.95 busy and served about 1.2x as many images in
alternating rounds. `server.priority.use_intra_op_threads` makes a thread's count stick.
"""

from __future__ import annotations

import os

SERVING_WAIT_POLICY = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"}


def use_serving_wait_policy() -> None:
    """Set `SERVING_WAIT_POLICY` in the environment unless an operator set either variable."""
    if not any(name in os.environ for name in SERVING_WAIT_POLICY):
        os.environ.update(SERVING_WAIT_POLICY)
