"""Reports carry their provenance: commit, date, machine, command, settings and the checksum of what they measured."""

from __future__ import annotations

import json
import subprocess

from aptp.formats.files import file_sha256
from aptp.formats.report import Provenance, collect_provenance, folder_checksum, write_report
from tests.helpers import REPO


def test_a_folder_is_checksummed_by_the_file_that_describes_it(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert folder_checksum(bundle) is None
    (bundle / "manifest.json").write_text('{"format": "aptp-bundle"}\n')
    assert folder_checksum(bundle) == file_sha256(bundle / "manifest.json")
    (bundle / "manifest.json").write_text('{"format": "aptp-bundle", "num_codes": 2}\n')
    assert folder_checksum(bundle) == file_sha256(bundle / "manifest.json")  # another model, another checksum


def test_provenance_names_the_commit_machine_command_and_models(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    teacher = REPO / "bundles" / "shapes" / "teacher"
    provenance = collect_provenance([teacher], config={"steps": 2}, command="aptp eval --steps 2")
    assert provenance.commit == head and isinstance(provenance.dirty, bool)
    assert provenance.bundles == {str(teacher): file_sha256(teacher / "teacher.json")}
    assert provenance.machine["cpus"] >= 1 and provenance.machine["torch"]
    assert provenance.command == "aptp eval --steps 2" and provenance.config == {"steps": 2}
    assert provenance.date[:4].isdigit() and provenance.date.endswith("+00:00")
    assert not provenance.backfilled


def test_outside_a_checkout_the_commit_is_unknown_not_invented(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    provenance = collect_provenance()
    assert provenance.commit is None and provenance.dirty is None
    assert "no commit" in provenance.line()


def test_write_report_stamps_json_and_markdown(tmp_path):
    provenance = Provenance(commit="a" * 40, dirty=False, date="2026-12-01T00:00:00+00:00", bundles={"b": "c" * 64})
    write_report(tmp_path, "one", {"figure": 1.5}, "| a |\n", provenance=provenance)
    written = json.loads((tmp_path / "one.json").read_text())
    assert written["figure"] == 1.5 and Provenance.model_validate(written["provenance"]) == provenance
    table = (tmp_path / "one.md").read_text()
    assert table.startswith("| a |\n") and "commit aaaaaaaaaa" in table and "`b` (cccccccccccc)" in table
    # A report that is a list (a comparison of reports) keeps its shape; the provenance goes beside it.
    write_report(tmp_path, "many", [{"name": "x"}], "| x |\n", provenance=provenance)
    assert json.loads((tmp_path / "many.json").read_text()) == [{"name": "x"}]
    assert Provenance.model_validate_json((tmp_path / "many.provenance.json").read_text()) == provenance
