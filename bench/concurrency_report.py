"""bench.concurrency's results as files: the raw JSON, a Markdown table with the goals, and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import goals_table, write_files  # noqa: E402
from .stats import summary  # noqa: E402

ENGINES = [
    ("sequential", "queue: one chat after another (LlamaChat)"),
    ("batched", "batched engine (batch_decoder.py)"),
    ("llama_server", "llama-server --parallel (C++ anchor)"),
    ("module_queue", "module via server, PARALLEL=1 (the queue)"),
    ("module_parallel", "module via server, PARALLEL=N (batched)"),
]


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(numpy.percentile(values, q)), 1) if values else None


def summarise(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One engine at one client count over the repeats: aggregate tokens/s per run (every reply's tokens over the
    time from the clients' arrival to the last token), and every chat's tokens/s and time to first token."""
    aggregate = [sum(c["tokens"] for c in run) / max(c["end_s"] for c in run) for run in runs]
    chats = [chat for run in runs for chat in run]
    ttfts = [c["ttft_ms"] for c in chats if c["ttft_ms"] is not None]
    return {
        "aggregate_tokens_per_second": summary(aggregate),
        "chat_tokens_per_second": summary(c["tokens_per_second"] for c in chats),
        "ttft_ms_p50": _percentile(ttfts, 50),
        "ttft_ms_p95": _percentile(ttfts, 95),
        "tokens": summary(c["tokens"] for c in chats),
    }


def _aggregate(results: dict[str, Any], engine: str, clients: int) -> float | None:
    part = ((results.get("summary") or {}).get(engine) or {}).get(str(clients)) or {}
    return (part.get("aggregate_tokens_per_second") or {}).get("median")


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The concurrency goals (listed below) at the most clients measured, as ratios of aggregate tokens/s within this
    run; the same for the module through the server when it was measured."""
    clients = max(results["settings"]["clients"])

    def goal(engine: str, reference: str, limit: float) -> dict[str, Any]:
        value, other = _aggregate(results, engine, clients), _aggregate(results, reference, clients)
        ratio = None if value is None or not other else round(value / other, 3)
        return {
            "goal": f"{clients} clients: {engine} aggregate >= {limit} x {reference}",
            "measured": ratio,
            "limit": limit,
            "met": None if ratio is None else ratio >= limit,
            "detail": f"{engine} {value} vs {reference} {other} tokens/s" if other else f"{reference} not measured",
        }

    goals = [goal("batched", "llama_server", 0.9), goal("batched", "sequential", 1.5)]
    if "module_parallel" in results["summary"]:
        goals.append(goal("module_parallel", "module_queue", 1.5))
    return goals


def _cell(part: dict[str, Any], metric: str) -> str:
    s = part.get(metric) or {}
    if s.get("median") is None:
        return "–"
    if s["min"] == s["max"]:
        return f"{s['median']:.1f}"
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| Engine | Clients | Aggregate tokens/s | Per-chat tokens/s | TTFT p50 ms | TTFT p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ENGINES:
        for clients in results["settings"]["clients"]:
            part = ((results.get("summary") or {}).get(key) or {}).get(str(clients))
            if part is None:
                continue
            lines.append(
                f"| {label} | {clients} | {_cell(part, 'aggregate_tokens_per_second')} | "
                f"{_cell(part, 'chat_tokens_per_second')} | {part['ttft_ms_p50']:.0f} | {part['ttft_ms_p95']:.0f} |"
            )
    return lines


def markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    same = results["same_replies"]
    lines = [
        f"# Concurrent clients: {results['model']}",
        "",
        f"{results['started_utc']} · commit {results.get('commit', 'not recorded')} · "
        f"{m['cpu']} · {m['logical_cpus']} logical CPUs · {s['threads']} threads for "
        f"every engine · {s['tokens']} tokens per reply, greedy · {', '.join(map(str, s['clients']))} clients "
        f"arriving together · {s['repeats']} repeats, engines taking turns · {s['n_ctx_per_chat']} tokens of "
        f"context per chat · llama-cpp-python {results['llama_cpp_python']}",
        "",
        f"1-minute load before measuring: {results['load_start']['load_1min']}; CPU other processes used while "
        f"measuring: {results['phases']['measuring']['other_processes_cores']} cores. Greedy replies of the batched "
        f"engine equal to the queue's (each chat decoded alone): {same['batched']} of {same['of']}"
        + (f"; through the module: {same['module_parallel']} of {same['of']}." if "module_parallel" in same else "."),
        "",
        "## Goals",
        "",
        *goals_table(results["goals"]),
        "",
        "## Throughput and latency",
        "",
        "Aggregate: all replies' tokens over the time from the clients' arrival to the last token, median (min–max) "
        "of the repeats. Per chat: a reply's tokens after its first over the time they took, median (min–max) of "
        "every chat. TTFT: from the arrival to a chat's first token, a queued chat's wait included, over every chat "
        "of every repeat. llama-server's tokens are its stream's chunks (one a token).",
        "",
        *table(results),
        "",
    ]
    if "llama_server" not in results["summary"]:
        lines += ["llama-server was not measured: pass `--llama-server PATH` for its row.", ""]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    clients = results["settings"]["clients"]
    engines = [(k, label) for k, label in ENGINES if k in (results.get("summary") or {})]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.suptitle(f"Concurrent clients: {results['model']}, {results['settings']['threads']} threads (median)")
    width = 0.8 / len(engines)
    for i, (key, label) in enumerate(engines):
        x = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(clients))]
        by_clients = results["summary"][key]
        axes[0].bar(x, [_aggregate(results, key, n) or 0 for n in clients], width, label=label)
        axes[1].bar(x, [by_clients[str(n)]["ttft_ms_p50"] or 0 for n in clients], width, label=label)
    for ax, unit in [(axes[0], "aggregate tokens/s"), (axes[1], "time to first token p50, ms")]:
        ax.set_xticks(range(len(clients)), [f"{n} client{'s' if n > 1 else ''}" for n in clients])
        ax.set_ylabel(unit)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "concurrency", markdown, ("concurrency.png", chart))
