"""`aptp serve` as operators run it: a real process, real sockets, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.helpers import free_port, wait_until_ready


def _queued(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("aptp_queue_depth{"))


def test_sigterm_drains_queued_requests_then_exits(tiny_bundle):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "APTP_BUNDLE": str(tiny_bundle),
        "APTP_PORT": str(port),
        "APTP_DEFAULT_STEPS": "2",
        "APTP_MAX_BATCH_SIZE": "8",
        "APTP_BATCHING": "request",
        "APTP_MAX_WAIT_MS": "60000",  # queued requests would wait a minute for a full batch unless drained
        "APTP_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "aptp.cli.main", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_ready(process, url)
        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/generate", json={"prompt": "a red circle", "seed": s}, timeout=120)
                for s in range(3)
            ]
            deadline = time.monotonic() + 60
            while _queued(url) < 3:
                assert time.monotonic() < deadline, "the three requests never sat queued together"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            responses = [future.result() for future in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert process.wait(timeout=60) == 0  # a clean drain is a clean exit
        output = process.stdout.read().decode()
        assert f"http://127.0.0.1:{port}" in output and "curl" in output
        assert "drained" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bundle_the_server_cannot_load_exits_2_naming_the_field(tiny_bundle, tmp_path):
    import json
    import shutil

    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["teacher_macs"] = 10**12
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "APTP_BUNDLE": str(bundle), "APTP_PORT": str(free_port()), "APTP_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "aptp.cli.main", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "aptp serve: error:" in done.stderr and "teacher_macs" in done.stderr
