"""explore.html as the CodeProject.AI Explorer sees it: three marked parts, cut out with greedy regexes,
with `_MID_` replaced by the module id and everything injected into a page shared with other modules."""

import re
from pathlib import Path

import pytest

from llamachat_server.explorer import extract_explorer_ui

EXPLORE_HTML = Path(__file__).resolve().parent.parent / "explore.html"

# The markers the real server cuts on (ModuleCollection.GetExplorerUI).
MARKERS = [
    ("/* START EXPLORER STYLE */", "/* END EXPLORER STYLE */"),
    ("<!-- START EXPLORER MARKUP -->", "<!-- END EXPLORER MARKUP -->"),
    ("// START EXPLORER SCRIPT", "// END EXPLORER SCRIPT"),
]


@pytest.fixture(scope="module")
def page_text() -> str:
    return EXPLORE_HTML.read_text(encoding="utf-8")


def test_each_marker_appears_once_so_the_greedy_cut_takes_only_its_part(page_text):
    for start, end in MARKERS:
        assert page_text.count(start) == 1, start
        assert page_text.count(end) == 1, end
        assert page_text.index(start) < page_text.index(end)


def test_every_id_class_and_css_name_of_the_explorer_parts_is_prefixed(page_text):
    parts = extract_explorer_ui(page_text)
    ids = re.findall(r'\bid="([^"]+)"', parts["html"])
    classes = [name for value in re.findall(r'\bclass="([^"]+)"', parts["html"]) for name in value.split()]
    assert ids
    assert classes
    assert [name for name in ids + classes if not name.startswith("_MID_")] == []

    # Strip declarations; what is left are selectors, at-rules and keyframe names.
    css_outside_blocks = re.sub(r"\{[^{}]*\}", "{}", parts["css"])
    selector_names = re.findall(r"[.#]([A-Za-z_][\w-]*)", css_outside_blocks)
    # .dark-mode is the Explorer's own body class, read (never styled) to follow its theme.
    assert [name for name in selector_names if not name.startswith("_MID_") and name != "dark-mode"] == []
    assert all(name.startswith("_MID_") for name in re.findall(r"@keyframes\s+([\w-]+)", parts["css"]))
    assert all(name.startswith("--_MID_") for name in re.findall(r"(--[\w-]+)\s*:", parts["css"]))


def test_markup_has_no_inline_handlers_and_leaves_the_explorer_s_own_ids_alone(page_text):
    markup = extract_explorer_ui(page_text)["html"]
    # Inline handlers would need global functions; the script binds its listeners itself.
    assert not re.search(r"\son\w+\s*=", markup)
    # submitRequest reads #serviceUrl when it exists: one inside the card would redirect every module.
    assert "serviceUrl" not in markup
    assert "<script" not in markup


def test_page_loads_nothing_from_the_network(page_text):
    assert not re.search(r"<script[^>]*\ssrc=|<link\b|@import|url\(", page_text)
    urls = re.findall(r"https?://[^\s\"'<>)]+", page_text)
    assert urls == ["http://localhost:32168"]
