"""Benchmark figures in README.md and docs/ are the ones in bench/results/*.json: every marked block is what
`python -m bench.figures` writes from the results as they are now, and every results file has a block somewhere.
Model-free and fast: it reads JSON and Markdown only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import figures


def test_every_figures_block_is_what_its_results_file_says_now():
    stale = {
        str(path.relative_to(figures.ROOT)): names
        for path in figures.documents()
        if (names := figures.rewritten(path)[1])
    }
    assert not stale, f"figures blocks out of date: {stale}; run `.venv/bin/python -m bench.figures` and commit"


def test_every_results_file_has_a_block():
    named = {
        match["name"].split(":")[0]
        for path in figures.documents()
        for match in figures.BLOCK.finditer(path.read_text(encoding="utf-8"))
    }
    results = {path.stem for path in figures.RESULTS_DIR.glob("*.json")}
    assert results - named == set(), "results files whose figures appear nowhere: add a block to docs/benchmarks.md"


@pytest.fixture()
def scratch(tmp_path, monkeypatch) -> Path:
    """A repository of one results file and one document, for the mechanism itself."""
    results_dir = tmp_path / "bench" / "results"
    results_dir.mkdir(parents=True)
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    monkeypatch.setattr(figures, "RESULTS_DIR", results_dir)
    (tmp_path / "docs").mkdir()
    return tmp_path


def _write_results(root: Path, measured: float, **extra) -> None:
    goal = {"goal": "speed >= 0.9 x raw", "measured": measured, "limit": 0.9, "met": measured >= 0.9, "detail": "d"}
    results = {"started_utc": "2026-12-01 10:00 UTC", "model": "m.gguf", "goals": [goal], **extra}
    (root / "bench" / "results" / "speed.json").write_text(json.dumps(results), encoding="utf-8")


def test_a_rerun_benchmark_makes_its_blocks_stale_until_they_are_written_again(scratch):
    document = scratch / "docs" / "page.md"
    document.write_text("Before.\n\n<!-- figures:speed -->\nhand-written\n<!-- /figures -->\n\nAfter.\n")
    _write_results(scratch, 0.95, commit="abc1234")
    text, changed = figures.rewritten(document)
    assert changed == ["speed"]
    document.write_text(text)
    assert figures.rewritten(document)[1] == []
    assert "| speed >= 0.9 x raw | 0.95 | 0.9 | yes | d |" in text
    assert "commit `abc1234`" in text and "[`bench/results/speed.json`](../bench/results/speed.json)" in text
    assert text.startswith("Before.\n\n") and text.endswith("\n\nAfter.\n")

    _write_results(scratch, 0.85, commit="def5678")  # the benchmark ran again
    text, changed = figures.rewritten(document)
    assert changed == ["speed"] and "| 0.85 | 0.9 | **no** |" in text and "commit `def5678`" in text


def test_a_results_file_without_a_commit_is_marked_as_such(scratch):
    document = scratch / "README.md"
    document.write_text("<!-- figures:speed -->\n<!-- /figures -->\n")
    _write_results(scratch, 0.95)
    text = figures.rewritten(document)[0]
    assert "**no commit recorded**" in text and "(bench/results/speed.json)" in text


@pytest.mark.parametrize(
    ("block", "says"),
    [("figures:missing", "there is no bench/results/missing.json"), ("figures:speed:nosuchview", "no such view")],
)
def test_a_block_naming_what_does_not_exist_is_an_error(scratch, block, says):
    document = scratch / "README.md"
    document.write_text(f"<!-- {block} -->\n<!-- /figures -->\n")
    _write_results(scratch, 0.95)
    with pytest.raises(figures.FigureError, match=says):
        figures.rewritten(document)


def test_the_command_line_check_fails_on_a_stale_block_and_the_rewrite_fixes_it(scratch, capsys):
    document = scratch / "README.md"
    document.write_text("<!-- figures:speed -->\nold\n<!-- /figures -->\n")
    _write_results(scratch, 0.95)
    assert figures.main(["--check"]) == 1
    assert "README.md: figures:speed differs from bench/results/speed.json" in capsys.readouterr().out
    assert document.read_text().count("old") == 1  # --check changes nothing
    assert figures.main([]) == 0
    assert figures.main(["--check"]) == 0


@pytest.mark.parametrize("stem", ["results", "concurrency", "conversations", "structured", "threads", "speculative"])
def test_each_benchmark_writes_its_report_from_its_committed_results(stem, tmp_path):
    # bench/ is outside mypy's files: a report that falls behind a shared helper fails only here, not after a long run.
    import importlib

    module = importlib.import_module("bench.report" if stem == "results" else f"bench.{stem}_report")
    results = json.loads((figures.RESULTS_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    written = module.write(results, tmp_path)
    assert {path.name for path in written} >= {f"{stem}.json", f"{stem}.md"}
    assert all(path.stat().st_size for path in written)
