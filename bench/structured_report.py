"""bench.structured's report: the table of tokens/s per schema and engine, and the goals judged."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .report import verdict, write_files

SPEED_GOAL = 0.9  # x llama-server's tokens/s under the same schema
UNCONSTRAINED_GOAL = 0.97  # x raw llama-cpp-python's, as the module's other speed goals


def table(results: dict[str, Any]) -> list[str]:
    """Tokens/s per schema and engine (medians) and the goals' ratios: the report's table and docs' figures."""
    lines = [
        f"| Schema | module, schema | llama-server, schema | ratio (goal ≥ {SPEED_GOAL}) | module, free | raw, free | "
        f"ratio (goal ≥ {UNCONSTRAINED_GOAL}) | llama-server, free | valid (module / llama-server) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["schemas"].items():
        t = row["tokens_per_second"]
        lines.append(
            f"| {name} | {t['module_schema']['median']:.1f} | {t['llama_server_schema']['median']:.1f} | "
            f"**{row['schema_vs_llama_server']:.2f}** | {t['module_free']['median']:.1f} | "
            f"{t['raw_free']['median']:.1f} | **{row['free_vs_raw']:.2f}** | {t['llama_server_free']['median']:.1f} | "
            f"{row['valid']['module_schema']:.0%} / {row['valid']['llama_server_schema']:.0%} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        f"# Structured output: {results['model']}",
        "",
        f"{results['started_utc']} · commit {results['commit']} · {m['cpu']} · {m['logical_cpus']} logical CPUs · "
        f"{s['threads']} threads for every engine · greedy · at most {s['tokens']} tokens · {s['repeats']} repeats, "
        f"engines taking turns · load {results['load_start']['load_1min']} at the start · "
        f"llama-cpp-python {results['llama_cpp_python']}",
        "",
        "Tokens per second as each engine reports its generation, median of the repeats; `valid`: replies that "
        "parse and validate against the schema.",
        "",
        *table(results),
        "",
        *(f"- {verdict(g['met']).strip()}: {g['goal']}: {g['measured']}" for g in results["goals"]),
        "",
    ]
    return "\n".join(lines)


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = results["schemas"].values()
    worst_schema = min(row["schema_vs_llama_server"] for row in rows)
    free = sorted(row["free_vs_raw"] for row in rows)
    typical_free = statistics.median(free)
    valid_share = min(share for row in rows for share in row["valid"].values())
    return [
        {
            "goal": f"under a JSON schema, module tokens/s >= {SPEED_GOAL} x llama-server's (worst schema)",
            "measured": worst_schema,
            "limit": SPEED_GOAL,
            "met": worst_schema >= SPEED_GOAL,
        },
        {
            # Free text is not what this bench changes: the median over the prompts, not the worst, as one prompt's
            # repeats vary by more than the margin on a shared 2-core machine.
            "goal": f"unconstrained, module tokens/s >= {UNCONSTRAINED_GOAL} x raw llama-cpp-python's (median prompt)",
            "measured": round(typical_free, 3),
            "limit": UNCONSTRAINED_GOAL,
            "met": typical_free >= UNCONSTRAINED_GOAL,
            "detail": f"per prompt {', '.join(f'{ratio:.2f}' for ratio in free)}",
        },
        {
            "goal": "replies that validate against their schema",
            "measured": valid_share,
            "limit": 1,
            "met": valid_share == 1,
        },
    ]


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "structured", markdown)
