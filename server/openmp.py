"""How OpenMP's worker threads wait for the next operation while the server runs, set before torch is imported
(OpenMP reads it once, when torch loads it). This module imports nothing heavy, so that it can run first.

Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) costs a wake-up per operation: at saturation the server ran at 0.5-0.6 of
its offline throughput, its 2 compute threads using 1.3 cores. Without a policy libgomp would not do better here: the
server has several threads that call torch (engine, routing, warm-up), and with more OpenMP threads than CPUs libgomp
spins only 100 times before sleeping (1000 under `ACTIVE`; GCC's libgomp manual, GOMP_SPINCOUNT). `ACTIVE` with a
spin count of 100,000 (about 0.1 ms) keeps the workers awake between the operations of a U-Net call and still lets
them sleep between batches (an idle process stays idle: tests/server/test_openmp.py). Beside other busy processes
on the same cores PASSIVE is the safer choice (spinning made a 2-thread teacher call several times slower there);
`benchmarks/serving.py` measures both.
"""

from __future__ import annotations

import os

SERVING_WAIT_POLICY = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"}


def use_serving_wait_policy() -> None:
    """Set `SERVING_WAIT_POLICY` in the environment unless an operator set either variable."""
    if not any(name in os.environ for name in SERVING_WAIT_POLICY):
        os.environ.update(SERVING_WAIT_POLICY)
