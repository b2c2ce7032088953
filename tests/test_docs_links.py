"""The links in README.md and docs/*.md lead somewhere: every relative link names a file of the repository, and every
#anchor a heading of its page (as GitHub makes anchors from headings). Model-free, reads Markdown only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from live_server import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)


def prose(page: Path) -> str:
    """The page without its code blocks, whose brackets and hashes are code, not links or headings."""
    return FENCED.sub("", page.read_text(encoding="utf-8"))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(heading) for heading in HEADING.findall(prose(page))}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for link in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link}: no heading '{fragment}' in {target.name}")
    assert not broken, broken


def test_anchors_are_made_as_github_makes_them():
    assert anchor("The OpenAI stream: bench.openai_stream") == "the-openai-stream-benchopenai_stream"
    assert anchor("1.1 Starting the module: its environment and its output") == (
        "11-starting-the-module-its-environment-and-its-output"
    )
