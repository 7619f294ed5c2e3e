"""Phase 1 across processes (torchrun / accelerate launch, gloo on the CPU): each process runs its share of the
global batch through the U-Net, the router's side runs on the whole batch, and the router comes out as from one
process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from router.model import Router
from tests.helpers import search_settings
from training.search import SearchConfig, run_search


def _settings(tiny_sd, tiny_captions, out) -> dict:
    return search_settings(tiny_sd, tiny_captions, out, balance_prompts=0, threads=1)


def test_two_processes_train_the_router_one_process_would(tiny_sd, tiny_captions, tmp_path):
    alone = Router.load(run_search(SearchConfig.model_validate(_settings(tiny_sd, tiny_captions, tmp_path / "one"))))
    config = tmp_path / "search.json"  # YAML is a superset of JSON
    config.write_text(json.dumps(_settings(tiny_sd, tiny_captions, tmp_path / "two")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "aptp.cli.main", "train", "search", "--config", str(config)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in records] == [2] * 4  # one log, written by the main process
    together = Router.load(tmp_path / "two" / "router")
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(together.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
