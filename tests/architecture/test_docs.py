"""The README is a short guide and the docs link only inside the repository, to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]*)(#[^)\s]*)?\)")


def test_the_readme_is_a_guide_not_a_journal():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("engine", "profiling", "cost-model", "recommend", "serving", "performance", "design"):
        assert f"docs/{page}.md" in text, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_stays_in_the_repository_and_resolves(page):
    for target, _anchor in LINK.findall(page.read_text()):
        if not target:
            continue  # an anchor on the same page
        assert "://" not in target, f"{page.name} links outside the repository: {target}"
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
