"""Benchmark figures in the documentation, written from bench/results/*.json so that they cannot drift.

README.md and docs/*.md hold marked blocks:

    <!-- figures:threads -->
    ...generated, never edited by hand...
    <!-- /figures -->

`figures:NAME` is a results file (bench/results/NAME.json) and `figures:NAME:VIEW` one view of it. Each block opens
with where its figures come from: the file, when it was measured and the commit it measured, or that the file does not
name one. `python -m bench.figures` rewrites every block from the results as they are now; `--check` only says which
blocks differ (tests/test_figures.py runs it), so a rerun benchmark or a hand edit inside a block fails the suite
until the blocks are written again. A results file with a `goals` or `targets` list needs no code here: its block is
that list as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from . import concurrency_report, conversations_report, openai_stream, structured_report, threads_report
from .report import goals_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
BLOCK = re.compile(r"<!-- figures:(?P<name>[\w.-]+(?::[\w-]+)?) -->\n(?P<body>.*?)<!-- /figures -->", re.S)

Results = dict[str, Any]


def documents() -> list[Path]:
    """The Markdown files that may hold blocks: the README and docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _range(summary: dict[str, Any] | None, digits: int = 1) -> str:
    """median (min–max) of a summary {median, min, max}; – when nothing was measured."""
    if not summary or summary.get("median") is None:
        return "–"
    median = f"{summary['median']:,.{digits}f}"
    if summary.get("min") is None or summary["min"] == summary["max"]:
        return median
    return f"{median} ({summary['min']:,.{digits}f}–{summary['max']:,.{digits}f})"


def provenance(results: Results, stem: str, document_dir: Path) -> str:
    """The line that opens a block: the file, when, which commit, on what."""
    link = os.path.relpath(RESULTS_DIR / f"{stem}.json", document_dir).replace(os.sep, "/")
    when = results.get("started_utc") or results.get("when") or "an unrecorded date"
    commit = results.get("commit")
    measured = (
        f"commit `{commit}`" if commit else "**no commit recorded** (it may predate later changes to what it measures)"
    )
    machine = results.get("machine") or {}
    model = results.get("model") or (results.get("settings") or {}).get("model")
    load = results.get("load") or results.get("load_start") or {}
    load_1min = (load.get("start") or load).get("load_1min", results.get("load_1min_at_start"))
    on = ", ".join(
        part
        for part in (
            f"{machine.get('cpu')} with {machine.get('physical_cpus')} cores" if machine else "",
            str(model) if model else "",
            f"1-minute load {load_1min} at the start" if load_1min is not None else "",
        )
        if part
    )
    return f"*[`bench/results/{stem}.json`]({link}): measured {when}, {measured}; {on}.*"


def goals(results: Results) -> list[str]:
    """The run's goals or targets as a table: any results file that judges itself has one of these lists."""
    for name in ("goal", "target"):
        items = results.get(f"{name}s")
        if items and all({name, "measured", "limit", "met"} <= set(item) for item in items):
            return goals_table([{"detail": "", **item} for item in items], name)
    return []


def results_engines(results: Results) -> list[str]:
    """bench (results.json): TTFT and tokens/s per engine."""
    engines = [
        ("raw", "raw llama-cpp-python"),
        ("wrapper", "LlamaChat wrapper, in process"),
        ("module", "module via the server, as its client sees it"),
        ("openai_stream", "OpenAI stream via the server, as the `openai` client sees it"),
        ("llama_server", "llama-server (C++)"),
    ]
    lines = ["| Engine | TTFT, cold, ms | tokens/s |", "|---|---|---|"]
    for key, label in engines:
        summary = ((results.get(key) or {}).get("generation") or {}).get("summary")
        if summary:
            lines.append(
                f"| {label} | {_range(summary.get('ttft_ms'), 0)} | {_range(summary.get('tokens_per_second'))} |"
            )
    module = ((results.get("module") or {}).get("generation") or {}).get("summary") or {}
    if module.get("module_tokens_per_second"):
        lines.append(
            f"| module via the server, its own metrics | {_range(module.get('module_ttft_ms'), 0)} | "
            f"{_range(module.get('module_tokens_per_second'))} |"
        )
    skipped = (results.get("llama_server") or {}).get("skipped")
    if skipped:
        lines += ["", f"llama-server: not measured in this run ({skipped})."]
    return lines


def conversations_paper(results: Results) -> list[str]:
    """bench.conversations: the KV bytes and restore speeds, and what they mean for Mistral-7B on paper."""
    part, paper = results["in_process"], conversations_report.paper(results)
    return [
        "| Figure | Value |",
        "|---|---|",
        f"| SmolLM2's KV bytes per token | {part['kv_bytes_per_token']:,} |",
        f"| restore from RAM | {part['restore_ram_mb_per_s']:,} MB/s |",
        f"| restore from disk (page cache, checksum checked) | {part['restore_disk_mb_per_s']:,} MB/s |",
        f"| on paper: Mistral-7B's 2,000-token conversation (128 KiB a token) | {paper['kv_mb']:,} MB of KV |",
        f"| on paper: restoring it from RAM / from disk | {paper['restore_ram_s']} s / {paper['restore_disk_s']} s |",
        f"| on paper: evaluating it again at this run's prompt speed scaled to 7B | {paper['evaluate_s']:,} s |",
    ]


def fit_time(results: Results) -> list[str]:
    """bench.fit_time: its targets, in ms."""
    lines = ["| Target | Measured ms | Limit ms | Met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['measured_ms']} | {t['limit_ms']} | {'yes' if t['met'] else '**no**'} |")
    return lines


def soak(results: Results) -> list[str]:
    """bench.soak: what ended how, and the memory."""
    endings = ", ".join(f"{count} {name}" for name, count in results["endings"].items())
    growth = results["rss_growth_pct"]
    checks = ", ".join(
        f"{name.replace('_', ' ')}: {'yes' if ok else '**no**'}" for name, ok in results["checks"].items()
    )
    return [
        f"{results['chats_ended']} of {results['chats']} chats ended ({endings}); {results['bad_inputs_sent']} bad "
        f"inputs sent, {results['failure_count']} failures; the module restarted {results['module_restarts']} times; "
        f"resident memory after the warm-up: server {growth['server']:+} %, module {growth['module']:+} %; "
        f"{results['elapsed_s']} s in all. Checks: {checks}.",
    ]


def security_limits(results: Results) -> list[str]:
    """bench.security_limits: bodies, a connection flood, idle connections, peer lookups."""
    lines = [
        "| Body | HTTP | answered in ms | server RSS growth MB | worst ping meanwhile ms |",
        "|---|---|---|---|---|",
    ]
    for body in results["bodies"]:
        lines.append(
            f"| {body['body']} | {body['http_status']} | {body['answered_in_ms']} | {body['server_rss_growth_mb']} | "
            f"{body['worst_ping_ms']} |"
        )
    c, p = results["connections"], results["peer_lookups"]
    lines += [
        "",
        f"Under a {results['descriptor_limit']:,}-descriptor limit, {c['connections']:,} connections sending half "
        f"their headers: {c['answered_503_at_once']} answered 503 at once, {c['held_then_closed']} closed by the "
        f"server, all closed after {c['all_closed_after_s']} s; worst ping meanwhile {c['worst_ping_meanwhile_ms']} "
        f"ms, {c['pings_failed_meanwhile']} failed; EMFILE logged: {'yes' if c['emfile_logged'] else 'no'}. An idle "
        f"kept-alive connection closed after {results['idle_connection_closed_after_s']} s. {p['connections']:,} "
        f"connections from another process to a module endpoint: {p['refused_403']} refused within "
        f"{p['all_refused_after_s']} s, worst ping meanwhile {p['worst_ping_meanwhile_ms']} ms.",
    ]
    return lines


def _ok(ok: bool) -> str:
    return "ok" if ok else "**failed**"


def package_install(results: Results) -> list[str]:
    """bench.package_install: the package unzipped, installed and self-tested in a fresh venv."""
    phases = results["phases"]
    return [
        f"Install {phases['install']['seconds']} s (llama-cpp-python: {results['llama_cpp_python']}; pip cache "
        f"{'on' if results['pip_cache'] else 'off'}), self-test {phases['selftest']['seconds']} s; install "
        f"{_ok(results['install_ok'])}, self-test {_ok(results['selftest_ok'])}.",
    ]


def token_count(results: Results) -> list[str]:
    """bench.token_count: what counting the model's tokens costs."""
    speed = results["tokens_per_second"]
    return [
        f"tokens/s with the module's token counting {_range(speed['counting'])} against plain llama-cpp-python "
        f"{_range(speed['llama_cpp_python'])}: {results['counting_over_plain']} ×.",
    ]


VIEWS: dict[str, Callable[[Results], list[str]]] = {
    "results": lambda r: results_engines(r) + ["", *goals(r)],
    "results:engines": results_engines,
    "threads": lambda r: threads_report.table(r) + ["", *threads_report.drops(r), *goals(r)],
    "concurrency": lambda r: concurrency_report.table(r) + ["", *goals(r)],
    "conversations:paper": conversations_paper,
    "openai_stream": lambda r: openai_stream.cadence_table(r) + ["", *goals(r)],
    "openai_stream:cadence": openai_stream.cadence_table,
    "fit_time": fit_time,
    "soak": soak,
    "security_limits": security_limits,
    "package_install": package_install,
    "token_count": token_count,
    "structured": lambda r: structured_report.table(r) + ["", *goals(r)],
}


def render(name: str, document_dir: Path) -> str:
    """A block's body: its provenance line and its figures."""
    stem = name.split(":")[0]
    path = RESULTS_DIR / f"{stem}.json"
    if not path.is_file():
        raise FigureError(f"figures:{name}: there is no {path.relative_to(ROOT)}")
    results = json.loads(path.read_text(encoding="utf-8"))
    view = VIEWS.get(name, goals if ":" not in name else None)
    if view is None:
        raise FigureError(f"figures:{name}: no such view (known: {', '.join(sorted(VIEWS))})")
    lines = view(results)
    if not lines:
        raise FigureError(f"figures:{name}: {path.name} has no goals or targets; add a view for it to bench/figures.py")
    return "\n".join([provenance(results, stem, document_dir), "", *lines]) + "\n"


class FigureError(ValueError):
    """A block names a results file or view that does not exist."""


def rewritten(path: Path) -> tuple[str, list[str]]:
    """The document with every block written again, and the names of the blocks that changed."""
    text = path.read_text(encoding="utf-8")
    changed: list[str] = []

    def block(match: re.Match[str]) -> str:
        body = render(match["name"], path.parent)
        if body != match["body"]:
            changed.append(match["name"])
        return f"<!-- figures:{match['name']} -->\n{body}<!-- /figures -->"

    return BLOCK.sub(block, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for path in documents():
        try:
            text, changed = rewritten(path)
        except FigureError as error:
            print(f"{path.relative_to(ROOT)}: {error}", file=sys.stderr)
            return 2
        for name in changed:
            stale += 1
            verb = "differs from" if args.check else "rewritten from"
            print(f"{path.relative_to(ROOT)}: figures:{name} {verb} bench/results/{name.split(':')[0]}.json")
        if changed and not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print("Run `python -m bench.figures` to write them again.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
