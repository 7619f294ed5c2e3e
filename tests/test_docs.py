"""The documentation stays true to the tree: every relative link resolves, and every source path ARCHITECTURE.md
names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES += [REPO / "benchmarks" / "results" / "index.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    links = [target.split("#")[0] for target in LINK.findall(page.read_text())]
    return [t for t in links if t and not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert page.is_file()
    missing = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_architecture_names_only_files_that_exist():
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:aptp|pruning|router|training|server|benchmarks|tests)/[\w/]*\.py)`", text))
    folders = set(re.findall(r"`((?:aptp|pruning|router|training|server)/[\w/]*/)`", text))
    assert len(named) > 10
    assert not [p for p in sorted(named | folders) if not (REPO / p).exists()]
    # A file named without its folder in a package's row ("space.py" in the row of `pruning/`) is in that package.
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    checked = 0
    for cells in rows:
        package = cells[1].strip().strip("`")
        if not package.endswith("/"):
            continue
        for name in re.findall(r"`(\w+\.py)`", cells[2]):
            assert (REPO / package / name).exists(), f"{package}{name}"
            checked += 1
    assert checked > 10
