"""`aptp serve` refuses a path it cannot serve with a message naming it (checked before any model library is
imported: 1.2 s measured here; issue 20 measured 12 s before the check)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("make, says", [(lambda p: p / "nowhere", "no such folder"), (lambda p: p, "not a bundle")])
def test_a_path_that_is_no_model_folder_is_answered_at_once(tmp_path, make, says):
    done = subprocess.run(
        [sys.executable, "-m", "aptp.cli.main", "serve", "--bundle", str(make(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert str(make(tmp_path)) in done.stderr
