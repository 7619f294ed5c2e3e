"""`aptp serve --ray` as operators run it: a real process that starts a local Ray cluster, serves, and on SIGTERM
answers what it holds, shuts Serve down and exits 0. Slow; needs `pip install '.[ray]'`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="needs Ray Serve: pip install '.[ray]'")

from tests.helpers import free_port, wait_until_ready  # noqa: E402


def _held(url: str) -> float:
    """Requests the ingress has sent to the experts and not had answered."""
    lines = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("aptp_queue_depth{"))


def test_sigterm_answers_the_requests_held_then_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "APTP_PORT": str(port), "APTP_THREADS": "1", "APTP_DRAIN_TIMEOUT_S": "120"}
    process = subprocess.Popen(
        [sys.executable, "-m", "aptp.cli.main", "serve", "--ray"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_ready(process, url, timeout_s=240)
        with ThreadPoolExecutor(3) as pool:
            body = {"prompt": "a red circle", "steps": 25}
            send = [{**body, "seed": seed} for seed in range(3)]
            futures = [pool.submit(httpx.post, f"{url}/generate", json=payload, timeout=300) for payload in send]
            deadline = time.monotonic() + 60
            while _held(url) < len(send):  # all sent on: a request still being routed at SIGTERM gets 503
                assert time.monotonic() < deadline, "no request reached the experts"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            answers = [future.exception() or future.result() for future in futures]
        statuses = [getattr(answer, "status_code", repr(answer)) for answer in answers]
        if statuses != [200, 200, 200]:
            process.kill()
            print(process.stdout.read().decode()[-5000:])
        assert statuses == [200, 200, 200]
        assert process.wait(timeout=180) == 0
        output = process.stdout.read().decode()
        assert "drained" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
