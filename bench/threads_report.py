"""bench.threads' results as files: the raw JSON, a Markdown table with the goals, and a PNG chart."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import goals_table, write_files  # noqa: E402

ENGINES = [
    ("raw_all", "raw llama-cpp-python, all cores"),
    ("raw_one", "raw llama-cpp-python, 1 thread"),
    ("module_all", "module, all cores pinned (the old default)"),
    ("module_one", "module, 1 thread pinned"),
    ("module_all_passive", "module, all cores, OMP_WAIT_POLICY=PASSIVE"),
    ("module_adaptive", "module, adaptive (the default)"),
    ("module_adaptive_page", "module, adaptive, polled at the Explorer page's pace"),
]
LOAD_LABELS = {"idle": "idle", "busy_core": "one core busy", "neighbour": "beside a 2nd llama.cpp process"}


def _median(results: dict[str, Any], load: str, engine: str, metric: str = "tokens_per_second") -> float | None:
    summary = ((results.get(load) or {}).get(engine) or {}).get("summary") or {}
    return (summary.get(metric) or {}).get("median")


def _best(results: dict[str, Any], load: str, engines: list[str]) -> float | None:
    values = [v for v in (_median(results, load, e) for e in engines) if v is not None]
    return max(values) if values else None


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals, as ratios within this run. Under load the module's speed is the one its polling client sees;
    idle, it is the module's own (a client polling every 250 ms sees too few growing polls for a fair figure)."""

    def goal(
        name: str,
        load: str,
        reference: float | None,
        limit: float,
        detail: str,
        engine: str = "module_adaptive",
        metric: str = "tokens_per_second",
    ) -> dict[str, Any]:
        adaptive = _median(results, load, engine, metric)
        ratio = None if adaptive is None or not reference else round(adaptive / reference, 3)
        return {
            "goal": name,
            "measured": ratio,
            "limit": limit,
            "met": None if ratio is None else ratio >= limit,
            "detail": f"adaptive module {adaptive} tokens/s vs {reference} ({detail})",
        }

    raw = ["raw_all", "raw_one"]
    settings = results["settings"]
    polled = [
        goal(
            f"idle, polled every {interval * 1000:g} ms: adaptive module >= 0.97 x raw all cores",
            "idle",
            _median(results, "idle", "raw_all"),
            0.97,
            "the module's own tokens/s against raw llama-cpp-python on all cores, idle",
            engine,
            "module_tokens_per_second",
        )
        for engine, interval in [
            ("module_adaptive", settings["poll_interval_s"]),
            ("module_adaptive_page", settings.get("page_poll_interval_s")),
        ]
        if interval is not None
    ]
    return [
        goal(
            "one core busy: adaptive module >= 0.9 x best fixed raw",
            "busy_core",
            _best(results, "busy_core", raw),
            0.9,
            "the faster of raw all cores / 1 thread under the same load",
        ),
        goal(
            "idle: adaptive module >= 0.97 x best fixed module",
            "idle",
            _best(results, "idle", ["module_all", "module_one"]),
            0.97,
            "the faster of the module pinned to all cores / 1 thread, idle",
        ),
        *polled,
        goal(
            "beside a 2nd llama.cpp process: adaptive module >= 0.4 x idle",
            "neighbour",
            _best(results, "idle", raw),
            0.4,
            "the best raw single-process speed, idle",
        ),
    ]


def _cell(results: dict[str, Any], load: str, engine: str, metric: str) -> str:
    summary = (((results.get(load) or {}).get(engine) or {}).get("summary") or {}).get(metric) or {}
    if summary.get("median") is None:
        return "–"
    if summary["min"] == summary["max"]:
        return f"{summary['median']:.0f}" if metric != "tokens_per_second" else f"{summary['median']:.1f}"
    digits = 1 if metric == "tokens_per_second" else 0
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def table(results: dict[str, Any]) -> list[str]:
    loads = [load for load in LOAD_LABELS if load in results]
    lines = [
        "| Engine | " + " | ".join(f"{LOAD_LABELS[load]}: tokens/s | TTFT ms | threads" for load in loads) + " |",
        "|---|" + "---|---|---|" * len(loads),
    ]
    for key, label in ENGINES:
        cells = [
            f"{_cell(results, load, key, 'tokens_per_second')} | {_cell(results, load, key, 'ttft_ms')} | "
            f"{_cell(results, load, key, 'threads')}"
            for load in loads
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    lines = [
        f"# Threads under load: {results['model']}",
        "",
        f"{results['started_utc']} · commit {results.get('commit', 'not recorded')} · "
        f"{m['cpu']} · {m['logical_cpus']} logical CPUs ({s['all_cores']} cores) · "
        f"{s['tokens']} tokens per reply, greedy · {s['repeats']} repeats, engines taking turns · replies cut "
        f"off after {s['time_box_s']:g} s · module polled every {s['poll_interval_s'] * 1000:g} ms"
        + (f" (the page's pace: {s['page_poll_interval_s'] * 1000:g} ms)" if "page_poll_interval_s" in s else "")
        + " · "
        f"llama-cpp-python {results['llama_cpp_python']}",
        "",
        f"1-minute load before measuring: {results['load_start']['load_1min']}; CPU other processes used "
        "during each load (cores): "
        + ", ".join(f"{k} {v['other_processes_cores']}" for k, v in results["phases"].items())
        + ".",
        "",
        "## Goals",
        "",
        *goals_table(results["goals"]),
        "",
        "## Tokens/s, time to first token, threads used",
        "",
        "Median (min–max). The module's figures are what its polling client sees; `threads` is the count "
        "the module reported at the end of the reply.",
        "",
        *table(results),
        "",
        *drops(results),
    ]
    return "\n".join(lines)


def drops(results: dict[str, Any]) -> list[str]:
    """The thread counts the adaptive module's polls saw while a reply ran: idle, any count below all cores is
    speed lost for nothing."""
    loads = [load for load in LOAD_LABELS if load in results]
    lines = [
        "Thread counts the polls saw while a reply ran (count: polls, all repeats):",
        "",
        "| Engine | " + " | ".join(LOAD_LABELS[load] for load in loads) + " |",
        "|---|" + "---|" * len(loads),
    ]
    for key, label in ENGINES:
        if not key.startswith("module_adaptive"):
            continue
        cells = []
        for load in loads:
            seen: Counter = Counter()
            for run in ((results.get(load) or {}).get(key) or {}).get("runs") or []:
                seen.update({int(k): v for k, v in (run.get("threads_seen") or {}).items()})
            cells.append(", ".join(f"{k}: {v}" for k, v in sorted(seen.items(), reverse=True)) or "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def chart(results: dict[str, Any], path: Path) -> None:
    loads = [load for load in LOAD_LABELS if load in results]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    fig.suptitle(f"Threads under load: {results['model']}, {results['settings']['all_cores']} cores (median)")
    width = 0.8 / len(ENGINES)
    for ax, metric, unit in [
        (axes[0], "tokens_per_second", "tokens/s"),
        (axes[1], "ttft_ms", "time to first token, ms"),
    ]:
        for i, (key, label) in enumerate(ENGINES):
            values = [_median(results, load, key, metric) or 0 for load in loads]
            x = [j + (i - (len(ENGINES) - 1) / 2) * width for j in range(len(loads))]
            ax.bar(x, values, width, label=label)
        ax.set_xticks(range(len(loads)), [LOAD_LABELS[load] for load in loads])
        ax.set_ylabel(unit)
        if metric == "ttft_ms":
            ax.set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "threads", markdown, ("threads.png", chart))
