"""bench.conversations' results as files: the raw JSON, a Markdown report with the goals, and a PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import goals_table, write_files  # noqa: E402
from .stats import summary  # noqa: E402

# Mistral-7B-Instruct-v0.2 Q4_K_M, the module's default model: 32 layers x 8 KV heads x 128 x (K + V) x 2 bytes (f16).
MISTRAL_KV_BYTES_PER_TOKEN = 128 * 1024
MISTRAL_PARAMS = 7.24e9
PAPER_TOKENS = 2000


def _ratios(rows: list[dict[str, Any]], engine: str, reference: str) -> list[float]:
    return [
        r[engine]["ttft_ms"] / r[reference]["ttft_ms"]
        for r in rows
        if engine in r and reference in r and r[engine]["ttft_ms"] and r[reference]["ttft_ms"]
    ]


def _sources(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["cached"]["prefix_source"] for r in rows})


def _last_turn(results: dict[str, Any], users: int) -> list[dict[str, Any]]:
    part = results["alternation"].get(str(users))
    if not part:
        return []
    last = max(r["turn"] for r in part["rows"])
    return [r for r in part["rows"] if r["turn"] == last]


def _median_ratio(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def turn_table(results: dict[str, Any], users: int) -> dict[str, Any]:
    """Per compared turn: median TTFT of the cached module, today's module, cold (and llama-server), and ratios."""
    rows = results["alternation"][str(users)]["rows"]
    table = {}
    for turn in sorted({r["turn"] for r in rows if "cold" in r}):
        at = [r for r in rows if r["turn"] == turn]
        table[turn] = {
            engine: summary(r[engine]["ttft_ms"] for r in at if engine in r)
            for engine in ("cached", "today", "cold", "llama_server")
        }
        table[turn]["sources"] = _sources(at)
        table[turn]["cached_vs_cold"] = _median_ratio(_ratios(at, "cached", "cold"))
        table[turn]["today_vs_cold"] = _median_ratio(_ratios(at, "today", "cold"))
    return table


def _growth(rss: dict[str, float]) -> float:
    """The most a module's RSS grew after loading, in MB."""
    return round(max(v for k, v in rss.items() if k != "after_load_mb") - rss["after_load_mb"], 1)


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []

    def goal(text: str, measured: float | None, limit: float, detail: str, below: bool = True) -> None:
        met = None if measured is None else (measured <= limit if below else measured >= limit)
        goals.append({"goal": text, "measured": measured, "limit": limit, "met": met, "detail": detail})

    for users, limit in ((2, 0.1), (4, 0.1), (8, 0.2)):
        rows = _last_turn(results, users)
        if not rows:
            continue
        ratio = _median_ratio(_ratios(rows, "cached", "cold"))
        sources = _sources(rows)
        goal(
            f"{users} users, turn {rows[0]['turn']}: returning user's TTFT <= {limit} x cold",
            ratio,
            limit,
            f"median of {len(rows)} users; prefix from {', '.join(sources)}; today "
            f"{_median_ratio(_ratios(rows, 'today', 'cold'))} x cold",
        )
        if any("llama_server" in r for r in rows):
            versus = _median_ratio(_ratios(rows, "cached", "llama_server"))
            goal(
                f"{users} users, turn {rows[0]['turn']}: module TTFT <= llama-server --parallel 4's",
                versus,
                1.0,
                "the module's own TTFT over llama-server's as its client sees it (median of the users' ratios)",
            )
    if results.get("restart"):
        rows = results["restart"]
        goal(
            "after a module restart: the first returning turn's TTFT <= 0.15 x cold",
            _median_ratio(_ratios(rows, "cached", "cold")),
            0.15,
            f"median of {len(rows)} users; prefix from {', '.join(_sources(rows))}",
        )
    single = results.get("single_user") or []
    if single:
        last = max(r["turn"] for r in single)
        rows = [r for r in single if r["turn"] == last]
        cached = summary(r["cached"]["ttft_ms"] for r in rows)["median"]
        today = summary(r["today"]["ttft_ms"] for r in rows)["median"]
        goal(
            f"one user alone, turn {last}: TTFT with the cache <= 1.05 x without",
            round(cached / today, 3) if cached and today else None,
            1.05,
            f"{cached} vs {today} ms, median of {len(rows)} repeats",
        )
    rss = results.get("rss")
    if rss:
        growth = {key: _growth(rss[key]) for key in ("cached", "today")}
        goal(
            "module RSS: what the cache adds <= its RAM tier's bound + 5 %",
            round(growth["cached"] - growth["today"], 1),
            round(rss["ram_bound_mb"] * 1.05, 1),
            f"MB of growth after loading, the cached module's {growth['cached']} less today's {growth['today']} "
            f"(its KV pages touched by longer conversations); {rss['cached']['after_load_mb']} MB after loading",
        )
    disk = results.get("disk_bound")
    if disk:
        goal(
            f"disk tier within its bound after {disk['conversations']} conversations",
            round(disk["largest_folder_bytes"] / 2**20, 2),
            round(disk["limit_bytes"] / 2**20, 2),
            f"MB, the folder's largest size seen; {disk['entries']} entries kept, {disk['evicted']} evicted",
        )
    return goals


def paper(results: dict[str, Any]) -> dict[str, Any]:
    """What the measured throughputs mean for Mistral-7B Q4_K_M's 2,000-token conversation, on paper."""
    part = results["in_process"]
    mb = PAPER_TOKENS * MISTRAL_KV_BYTES_PER_TOKEN / 1e6
    # Evaluating a prompt costs about 2 x parameters FLOPs a token: scale the small model's measured speed.
    tokens_per_second = part["evaluate_tokens_per_second"] * part["model_params"] / MISTRAL_PARAMS
    return {
        "kv_mb": round(mb, 1),
        "restore_ram_s": round(mb / part["restore_ram_mb_per_s"], 2),
        "restore_disk_s": round(mb / part["restore_disk_mb_per_s"], 2),
        "evaluate_tokens_per_second": round(tokens_per_second, 1),
        "evaluate_s": round(PAPER_TOKENS / tokens_per_second, 1),
    }


def _ms(cell: dict[str, Any] | None) -> str:
    return "–" if not cell or cell.get("median") is None else f"{cell['median']:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    part = results["in_process"]
    lines = [
        "# Conversations: a returning user's time to first token",
        "",
        f"`python -m bench.conversations`, {results['started_utc']}, commit {results['commit']}, "
        f"{results['duration_s']} s. Model {results['model']}, llama-cpp-python {results['llama_cpp_python']}, "
        f"{s['threads']} threads, {s['n_ctx']}-token context; {results['machine']['cpu']} "
        f"({results['machine']['logical_cpus']} CPUs), 1-minute load {results['load_start']['load_1min']} at the "
        "start.",
        "",
        f"Users take turns, {s['turns']} turns each, greedy {s['tokens']}-token replies. The cached module has a "
        f"{s['ram_mb']} MB RAM tier and a {s['disk_gb']} GB disk tier; today's module has none (it reuses only its "
        "live context, as before). Cold: the same request after a chat with another system prompt. TTFT is the "
        "module's own (from the chat's start to its first token), median over the users.",
        "",
        "![conversations chart](conversations.png)",
        "",
        "| Users | Turn | cached module ms | prefix from | today ms | cold ms | llama-server ms | cached / cold |"
        " today / cold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for users in s["users"]:
        for turn, row in turn_table(results, users).items():
            lines.append(
                f"| {users} | {turn} | {_ms(row['cached'])} | {', '.join(row['sources'])} | {_ms(row['today'])} | "
                f"{_ms(row['cold'])} | {_ms(row['llama_server'])} | {row['cached_vs_cold']} | {row['today_vs_cold']} |"
            )
    restart = results.get("restart") or []
    if restart:
        lines += [
            "",
            f"After the module restarted (same cache folder), each of the {len(restart)} users' next turn: cached "
            f"{_ms(summary(r['cached']['ttft_ms'] for r in restart))} ms "
            f"(from {', '.join(_sources(restart))}), cold "
            f"{_ms(summary(r['cold']['ttft_ms'] for r in restart))} ms.",
        ]
    on_paper = paper(results)
    lines += [
        "",
        "## KV bytes and restore throughput (in process)",
        "",
        f"- KV cache: {part['kv_bytes_per_token']:,} bytes per token ({part['tokens']} tokens = "
        f"{part['kv_bytes'] / 1e6:.1f} MB).",
        f"- Restore (find, check, llama_state_seq_set_data): from RAM {_ms(part['restore_ram_ms'])} ms = "
        f"{part['restore_ram_mb_per_s']} MB/s; from disk {_ms(part['restore_disk_ms'])} ms = "
        f"{part['restore_disk_mb_per_s']} MB/s (the file read, likely from the page cache, and its checksum). "
        f"Evaluating the same tokens: {part['evaluate_ms']:,.0f} ms ({part['evaluate_tokens_per_second']} tokens/s).",
        f"- On paper, Mistral-7B Q4_K_M (128 KiB of KV per token at f16), a {PAPER_TOKENS:,}-token conversation: "
        f"{on_paper['kv_mb']} MB of KV, restored in {on_paper['restore_ram_s']} s from RAM or "
        f"{on_paper['restore_disk_s']} s from disk at these throughputs, against ~{on_paper['evaluate_s']} s to "
        f"evaluate it again (~{on_paper['evaluate_tokens_per_second']} tokens/s: this model's prompt speed scaled by "
        "the parameter count, an estimate).",
        "",
        "## Goals",
        "",
        *goals_table(results["goals"]),
        "",
    ]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    users = results["settings"]["users"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    engines = [("cached", "with the cache"), ("today", "today (live context only)"), ("cold", "cold")]
    width = 0.8 / len(engines)
    labels = []
    for i, n in enumerate(users):
        rows = _last_turn(results, n)
        labels.append(f"{n} users, turn {rows[0]['turn']}" if rows else f"{n} users")
        for j, (engine, _) in enumerate(engines):
            value = summary(r[engine]["ttft_ms"] for r in rows if engine in r)["median"] or 0
            ax.bar(i + (j - 1) * width, value, width, color=f"C{j}")
    restart = results.get("restart") or []
    if restart:
        labels.append("after a restart")
        i = len(users)
        for j, engine in ((0, "cached"), (2, "cold")):
            ax.bar(i + (j - 1) * width, summary(r[engine]["ttft_ms"] for r in restart)["median"], width, color=f"C{j}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(f"A returning user's first token ({results['model']}, {results['settings']['threads']} threads)")
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=f"C{j}") for j in range(len(engines))], [e[1] for e in engines])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "conversations", markdown, ("conversations.png", chart))
