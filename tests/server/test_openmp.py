"""`aptp serve`'s OpenMP wait policy: workers spin a bounded while, so an idle server does not burn its cores, and an
operator's own setting wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server.openmp import SERVING_WAIT_POLICY, use_serving_wait_policy

IDLE_PROCESS = """
import json, os, resource, time
from server.openmp import use_serving_wait_policy
use_serving_wait_policy()
import torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
for _ in range(200):
    a @ a
before = resource.getrusage(resource.RUSAGE_SELF)
time.sleep(2.0)
after = resource.getrusage(resource.RUSAGE_SELF)
idle = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({"idle_cpu_s": idle, "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _run(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in SERVING_WAIT_POLICY}
    done = subprocess.run(
        [sys.executable, "-c", IDLE_PROCESS], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_spin_then_sleep_so_an_idle_process_stays_idle():
    result = _run({})
    assert result["policy"] == "ACTIVE"
    # 2 s idle after work: an unbounded spin (ACTIVE alone) would burn about 2 CPU-seconds per worker here
    assert result["idle_cpu_s"] < 0.3


def test_an_operators_wait_policy_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    use_serving_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    assert _run({"OMP_WAIT_POLICY": "PASSIVE"})["policy"] == "PASSIVE"
