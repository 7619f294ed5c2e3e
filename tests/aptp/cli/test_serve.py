"""`aptp serve` refuses what it cannot serve with a message, before it loads anything heavy."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("make, says", [(lambda p: p / "nowhere", "no such folder"), (lambda p: p, "not a bundle")])
def test_a_path_that_is_no_model_folder_is_answered_at_once(tmp_path, make, says):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "aptp.cli.main", "serve", "--bundle", str(make(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert str(make(tmp_path)) in done.stderr
    assert time.monotonic() - started < 60  # no model library is imported first (about 1 s here)
