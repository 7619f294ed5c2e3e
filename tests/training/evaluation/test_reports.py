"""Eval reports: reports written before the paraphrase set still read and compare beside newer ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.evaluation.reports import EvalReport, comparison_table, difference_table, read_report

SHIPPED = Path("benchmarks/results/eval/shipped")


def _with_paraphrases(report: EvalReport, name: str) -> EvalReport:
    data = report.model_dump(mode="json")
    paraphrases = {**data["results"][0], "split": "paraphrases"}
    return EvalReport.model_validate({**data, "name": name, "results": [*data["results"], paraphrases]})


def test_a_report_without_paraphrases_reads_and_shows_a_dash():
    old = read_report(SHIPPED / "teacher.json")
    assert old.split("paraphrases") is None and old.split("test").split == "test"
    new = _with_paraphrases(old, "newer")
    rows = [line for line in comparison_table([old, new]).splitlines() if line.startswith("| ")][1:]
    paraphrase_cells = [row.split("|")[10].strip() for row in rows]
    assert paraphrase_cells[0] == "-" and paraphrase_cells[1] == f"{new.split('paraphrases').alignment['overall']:.3f}"
    table = difference_table([old, new], reference="newer")
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {old.name} |")]
    assert row.rstrip(" |").endswith("-")  # no paraphrases to pair with


@pytest.mark.parametrize("splits", [["heldout", "test"], ["test", "heldout", "test"], ["test"]])
def test_splits_out_of_order_are_refused(splits):
    data = json.loads((SHIPPED / "teacher.json").read_text())
    first = data["results"][0]
    data["results"] = [{**first, "split": split} for split in splits]
    with pytest.raises(ValueError, match="in that order"):
        EvalReport.model_validate(data)
