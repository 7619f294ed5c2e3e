"""Reports that evaluation and the benchmark scripts write: figures (JSON) and a table (markdown), each with the
provenance that makes a number citable: the commit, whether the tree had uncommitted changes, the date, the
machine, the command, the checksum of every model folder it measured, and the settings it ran with."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .files import file_sha256

# The file whose checksum stands for a model folder: it lists the checksum of every other file in the folder.
DESCRIBING_FILES = ("manifest.json", "teacher.json", "model_index.json", "expert.json", "config.json")


class Provenance(BaseModel):
    """Where a report's figures come from.

    Parameters:
        commit (`str`, *optional*): the git commit the code ran at (None outside a git checkout).
        dirty (`bool`, *optional*): whether tracked files differed from that commit.
        date (`str`): ISO 8601, UTC.
        machine (`dict`, *optional*): host, platform, CPU count, Python, torch and its thread count.
        command (`str`, *optional*): the command line.
        bundles (`dict[str, str | None]`): each measured model folder -> sha256 of its describing file
            (`manifest.json`, `teacher.json`, ...), None when the folder has none.
        config (`dict`, *optional*): the settings of the run.
        backfilled (`bool`): True for reports written before provenance was recorded, completed from git history.
    """

    model_config = ConfigDict(extra="forbid")

    commit: str | None = None
    dirty: bool | None = None
    date: str
    machine: dict[str, Any] | str | None = None
    command: str | None = None
    bundles: dict[str, str | None] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
    backfilled: bool = False

    def line(self) -> str:
        """One markdown line for the table's foot."""
        commit = (
            "no commit" if self.commit is None else f"commit {self.commit[:10]}" + (" (dirty)" if self.dirty else "")
        )
        machine = self.machine if isinstance(self.machine, str) else None
        if isinstance(self.machine, dict):
            machine = (
                f"{self.machine.get('machine')}, {self.machine.get('cpus')} CPUs, torch {self.machine.get('torch')}"
            )
        folders = ", ".join(f"`{k}` ({v[:12] if v else 'no checksum'})" for k, v in self.bundles.items())
        parts = [commit, self.date[:10], machine, folders and f"models {folders}"]
        return "Provenance: " + "; ".join(p for p in parts if p) + "."


def folder_checksum(folder: str | Path) -> str | None:
    """sha256 of the file that describes a model folder (see `DESCRIBING_FILES`), None if it has none."""
    for name in DESCRIBING_FILES:
        path = Path(folder) / name
        if path.is_file():
            return file_sha256(path)
    return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine_summary() -> dict[str, Any]:
    import torch

    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def collect_provenance(
    bundles: Iterable[str | Path] = (), config: dict[str, Any] | None = None, command: str | None = None
) -> Provenance:
    """The provenance of a run happening now, in the current working directory's checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return Provenance(
        commit=commit,
        dirty=None if status is None else bool(status),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine_summary(),
        command=command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        bundles={str(b): folder_checksum(b) for b in bundles},
        config=config,
    )


def write_report(
    out: str | Path, stem: str, report: Any, table: str, echo: bool = False, provenance: Provenance | None = None
) -> Path:
    """Write `<out>/<stem>.json` (the figures, with a `provenance` key; a report that is a JSON list gets
    `<stem>.provenance.json` beside it) and `<out>/<stem>.md` (`table`, then the provenance line). With `echo`,
    print the table and where it went (the benchmark scripts). Returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = provenance or collect_provenance()
    stamp = provenance.model_dump(mode="json")
    if isinstance(report, dict):
        report = {**report, "provenance": stamp}
    else:
        (out / f"{stem}.provenance.json").write_text(json.dumps(stamp, indent=1) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    table = table.rstrip("\n") + "\n\n" + provenance.line() + "\n"
    (out / f"{stem}.md").write_text(table)
    if echo:
        print(table, end="")
        print(f"wrote {out / stem}.json and .md")
    return out / f"{stem}.md"
