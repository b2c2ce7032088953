"""The run's results as files: the raw JSON, a Markdown report with the targets, and a PNG chart."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .openai_client import SPEED_GOAL, TTFT_GAP_GOAL_MS  # noqa: E402

ENGINES = [
    ("raw", "raw llama-cpp-python"),
    ("wrapper", "LlamaChat wrapper (in process)"),
    ("module", "module via server (client)"),
    ("openai_stream", "OpenAI stream via server (client)"),
    ("llama_server", "llama-server (C++)"),
]


def _median(summary: dict[str, Any] | None) -> float | None:
    return None if not summary else summary.get("median")


def _generation(results: dict[str, Any], engine: str) -> dict[str, Any] | None:
    part = results.get(engine) or {}
    return (part.get("generation") or {}).get("summary")


def _last_turn(results: dict[str, Any], engine: str) -> dict[str, Any] | None:
    turns = ((results.get(engine) or {}).get("conversation") or {}).get("turns")
    return turns[-1] if turns else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The module's speed, cancel and memory targets (listed below), each as ratios or limits from this same run."""
    raw, module = _generation(results, "raw") or {}, _generation(results, "module") or {}
    stream = _generation(results, "openai_stream") or {}
    poll_ms = results["settings"]["poll_interval_s"] * 1000
    raw_tps, raw_ttft = _median(raw.get("tokens_per_second")), _median(raw.get("ttft_ms"))
    token_ms = 1000 / raw_tps if raw_tps else None
    last = _last_turn(results, "module")
    module_part = results.get("module") or {}
    cancel_gen = (module_part.get("cancel_generation") or {}).get("latency_ms")
    cancel_prompt = (module_part.get("cancel_prompt") or {}).get("latency_ms")
    memory = module_part.get("memory") or {}

    def target(
        name: str, measured: float | None, limit: float | None, higher_is_better: bool, detail: str
    ) -> dict[str, Any]:
        met = (
            None
            if measured is None or limit is None
            else (measured >= limit if higher_is_better else measured <= limit)
        )
        return {"target": name, "measured": measured, "limit": limit, "met": met, "detail": detail}

    return [
        target(
            "module tokens/s >= 0.97 x raw",
            _ratio(_median(module.get("tokens_per_second")), raw_tps),
            0.97,
            True,
            f"client-visible {_median(module.get('tokens_per_second'))} vs raw {raw_tps} tokens/s; "
            f"module-reported {_median(module.get('module_tokens_per_second'))}",
        ),
        target(
            f"OpenAI stream tokens/s >= {SPEED_GOAL} x raw",
            _ratio(_median(stream.get("tokens_per_second")), raw_tps),
            SPEED_GOAL,
            True,
            f"openai client, first to last chunk: {_median(stream.get('tokens_per_second'))} vs raw {raw_tps} "
            f"tokens/s; module-reported {_median(stream.get('module_tokens_per_second'))}",
        ),
        target(
            "OpenAI stream: client TTFT - module TTFT (ms)",
            _median(stream.get("ttft_gap_ms")),
            TTFT_GAP_GOAL_MS,
            False,
            f"client {_median(stream.get('ttft_ms'))} ms, module-reported {_median(stream.get('module_ttft_ms'))} ms "
            "(medians of the same chats)",
        ),
        target(
            "client-visible TTFT <= raw TTFT + one poll interval (ms)",
            _median(module.get("ttft_ms")),
            None if raw_ttft is None else round(raw_ttft + poll_ms, 1),
            False,
            f"raw {raw_ttft} ms + poll {poll_ms:g} ms; module-reported {_median(module.get('module_ttft_ms'))} ms",
        ),
        target(
            f"turn-{last['turn'] if last else 10} TTFT <= 0.2 x cold",
            None
            if not last
            else _ratio(_median(last["warm"].get("module_ttft_ms")), _median(last["cold"].get("module_ttft_ms"))),
            0.2,
            False,
            "module-reported TTFT, warm (prefix reused) over cold"
            + (
                ""
                if not last
                else f": {_median(last['warm'].get('module_ttft_ms'))} vs "
                f"{_median(last['cold'].get('module_ttft_ms'))} ms"
            ),
        ),
        target(
            "cancel during generation <= one token time + 50 ms",
            _median(cancel_gen),
            None if token_ms is None else round(token_ms + 50, 1),
            False,
            f"client-visible, median of {cancel_gen['n'] if cancel_gen else 0}; max "
            f"{cancel_gen['max'] if cancel_gen else None} ms; "
            f"one token = {round(token_ms, 1) if token_ms else None} ms",
        ),
        target(
            "cancel during prompt processing <= 200 ms",
            _median(cancel_prompt),
            200.0,
            False,
            f"client-visible, median of {cancel_prompt['n'] if cancel_prompt else 0}; max "
            f"{cancel_prompt['max'] if cancel_prompt else None} ms; "
            f"prompt of {module_part.get('long_prompt_tokens')} tokens",
        ),
        target(
            f"RSS growth over {memory.get('chats', 100)} chats < 5 %",
            memory.get("growth_pct"),
            5.0,
            False,
            f"{memory.get('rss_after_load_mb')} MB after loading, {memory.get('rss_after_first_chat_mb')} MB after "
            f"the first chat, {memory.get('rss_after_chats_mb')} MB after the last; raw llama-cpp-python on the "
            f"same chats {((results.get('raw') or {}).get('memory') or {}).get('growth_pct')} %, with gc.collect() "
            f"after each chat {((results.get('raw') or {}).get('memory_gc_each_chat') or {}).get('growth_pct')} %",
        ),
    ]


def _memory_curves(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    raw = results.get("raw") or {}
    curves = [
        ("module process", (results.get("module") or {}).get("memory")),
        ("raw llama-cpp-python, same chats", raw.get("memory")),
        ("raw, gc.collect() after each chat", raw.get("memory_gc_each_chat")),
    ]
    return [(label, memory) for label, memory in curves if memory]


def _cell(summary: dict[str, Any] | None, digits: int = 1) -> str:
    if not summary or summary.get("median") is None:
        return "–"
    if summary["n"] == 1 or summary["min"] == summary["max"]:
        return f"{summary['median']:.{digits}f}"
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    settings, machine, load = results["settings"], results["machine"], results["load"]
    lines = [
        f"# LlamaChat benchmark: {results['model']}",
        "",
        f"{results['started_utc']} · commit {results.get('commit', 'not recorded')} · "
        f"{machine['cpu']} · {machine['logical_cpus']} logical CPUs · "
        f"{settings['threads']} threads · n_ctx {results['n_ctx']} · greedy (temperature 0) · "
        f"llama-cpp-python {results['llama_cpp_python']} · poll every {settings['poll_interval_s'] * 1000:g} ms",
        "",
        f"1-minute load before measuring: {load['start']['load_1min']} "
        f"({'idle' if load['start']['idle'] else 'BUSY: numbers are noisy'}). "
        "Cells: median (min–max) of the repeats.",
        "",
        "## Targets",
        "",
        *goals_table(results["targets"], "target"),
    ]

    lines += [
        "",
        f"## Generation ({settings['generation_tokens']} tokens, cold cache, {settings['repeats']} repeats)",
        "",
        "| Engine | TTFT ms | tokens/s | tokens | module-reported TTFT ms | module-reported tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ENGINES:
        gen = _generation(results, key)
        if gen:
            lines.append(
                f"| {label} | {_cell(gen.get('ttft_ms'))} | {_cell(gen.get('tokens_per_second'))} | "
                f"{_cell(gen.get('tokens'), 0)} | {_cell(gen.get('module_ttft_ms'))} | "
                f"{_cell(gen.get('module_tokens_per_second'))} |"
            )
    if (results.get("llama_server") or {}).get("skipped"):
        lines += ["", f"llama-server: not measured ({results['llama_server']['skipped']})."]

    module_turns = ((results.get("module") or {}).get("conversation") or {}).get("turns") or []
    raw_turns = ((results.get("raw") or {}).get("conversation") or {}).get("turns") or []
    if module_turns:
        lines += [
            "",
            f"## {len(module_turns)}-turn conversation: TTFT per turn, ms "
            f"({settings['conversation_repeats']} repeats, {settings['conversation_tokens']}-token replies)",
            "",
            "Warm: the whole conversation is sent each turn and the cached prefix is reused. "
            "Cold: the same request with nothing cached.",
            "",
            "| Turn | prompt tokens | cached (warm) | module warm | module cold | raw warm | raw cold |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, turn in enumerate(module_turns):
            raw_turn = raw_turns[i] if i < len(raw_turns) else None
            lines.append(
                f"| {turn['turn']} | {_cell(turn['warm'].get('prompt_tokens'), 0)} | "
                f"{_cell(turn['warm'].get('cached_tokens'), 0)} | {_cell(turn['warm'].get('module_ttft_ms'))} | "
                f"{_cell(turn['cold'].get('module_ttft_ms'))} | "
                f"{_cell(raw_turn['warm'].get('ttft_ms')) if raw_turn else '–'} | "
                f"{_cell(raw_turn['cold'].get('ttft_ms')) if raw_turn else '–'} |"
            )

    module = results.get("module") or {}
    if module.get("cancel_generation"):
        lines += [
            "",
            f"## Cancel latency, client-visible ({settings['cancel_repeats']} repeats)",
            "",
            "From sending cancel_command to the first status poll that shows the chat ended "
            "(polled every 5 ms after the cancel).",
            "",
            "| During | latency ms | tokens generated after the cancel |",
            "|---|---|---|",
            f"| generation | {_cell(module['cancel_generation']['latency_ms'])} | "
            f"{_cell(module['cancel_generation']['tokens_after_cancel'], 0)} |",
            f"| processing a {module.get('long_prompt_tokens')}-token prompt | "
            f"{_cell(module['cancel_prompt']['latency_ms'])} | "
            f"{_cell(module['cancel_prompt']['tokens_after_cancel'], 0)} |",
        ]
    if module.get("memory"):
        lines += [
            "",
            f"## Memory (RSS) over {module['memory']['chats']} chats of "
            f"{settings['memory_chat_tokens']} tokens, each a different prompt",
            "",
            "| Process | after loading MB | after the first chat MB | after the last MB | growth from loading |"
            " growth from the first chat |",
            "|---|---|---|---|---|---|",
        ]
        for label, memory in _memory_curves(results):
            lines.append(
                f"| {label} | {memory['rss_after_load_mb']} | {memory['rss_after_first_chat_mb']} | "
                f"{memory['rss_after_chats_mb']} | {memory['growth_pct']:+.2f} % | "
                f"{memory['growth_after_first_chat_pct']:+.2f} % |"
            )
    lines += [
        "",
        "## Machine load during each part",
        "",
        "| Part | seconds | load before | load after | other processes' CPU (cores) |",
        "|---|---|---|---|---|",
    ]
    for name, part in load["phases"].items():
        lines.append(
            f"| {name} | {part['seconds']} | {part['load_before']} | {part['load_after']} | "
            f"{part['other_processes_cores']} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(
        f"LlamaChat vs the engine under it: {results['model']}, {results['settings']['threads']} threads "
        f"(median, bars = min–max)"
    )
    labels, gens = [], []
    for key, label in ENGINES:
        gen = _generation(results, key)
        if gen:
            labels.append(textwrap.fill(label, 18))
            gens.append(gen)

    def bars(ax, metric: str, title: str, unit: str) -> None:
        medians = [g[metric]["median"] or 0 for g in gens]
        low = [m - (g[metric]["min"] or m) for m, g in zip(medians, gens)]
        high = [(g[metric]["max"] or m) - m for m, g in zip(medians, gens)]
        ax.bar(range(len(gens)), medians, yerr=[low, high], capsize=4, color="#4878a8")
        ax.set_xticks(range(len(gens)), labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel(unit)
        for i, m in enumerate(medians):
            ax.annotate(f"{m:.0f}", (i, m), ha="center", va="bottom", fontsize=8)

    bars(axes[0][0], "tokens_per_second", "Generation speed", "tokens/s")
    bars(axes[0][1], "ttft_ms", "Time to first token (cold)", "ms")

    ax = axes[0][2]
    module = results.get("module") or {}
    if module.get("cancel_generation"):
        parts = [
            ("generation", module["cancel_generation"]["latency_ms"]),
            (f"{module.get('long_prompt_tokens')}-token\nprompt", module["cancel_prompt"]["latency_ms"]),
        ]
        medians = [p[1]["median"] or 0 for p in parts]
        ax.bar(
            range(2),
            medians,
            yerr=[
                [m - (p[1]["min"] or m) for m, p in zip(medians, parts)],
                [(p[1]["max"] or m) - m for m, p in zip(medians, parts)],
            ],
            capsize=4,
            color="#c0504d",
        )
        ax.set_xticks(range(2), [p[0] for p in parts])
    ax.set_title("Cancel latency (client-visible)")
    ax.set_ylabel("ms")

    ax = axes[1][0]
    for key, metric, style, label in [("module", "module_ttft_ms", "-", "module"), ("raw", "ttft_ms", "--", "raw")]:
        turns = ((results.get(key) or {}).get("conversation") or {}).get("turns") or []
        if turns:
            x = [t["turn"] for t in turns]
            ax.plot(x, [t["warm"][metric]["median"] for t in turns], style, marker="o", label=f"{label} warm")
            ax.plot(x, [t["cold"][metric]["median"] for t in turns], style, marker="x", label=f"{label} cold")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Conversation: TTFT per turn (module: as it reports it)")
    ax.set_xlabel("turn")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    for label, memory in _memory_curves(results):
        curve = memory["curve"]
        ax.plot([c["chats"] for c in curve], [c["rss_mb"] for c in curve], marker="o", markersize=3, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Resident memory over chats")
    ax.set_xlabel("chats")
    ax.set_ylabel("MB")

    ax = axes[1][2]
    ax.axis("off")
    rows = [
        [
            textwrap.fill(t["target"], 34),
            str(t["measured"]),
            str(t["limit"]),
            {True: "yes", False: "NO", None: "–"}[t["met"]],
        ]
        for t in results["targets"]
    ]
    table = ax.table(
        cellText=rows,
        colLabels=["target", "measured", "limit", "met"],
        loc="center",
        colWidths=[0.64, 0.14, 0.14, 0.08],
        cellLoc="left",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 2.1)
    ax.set_title("Targets")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals_table(goals: list[dict[str, Any]], name: str = "goal") -> list[str]:
    """Markdown lines of a table of targets or goals: what, measured, limit, met, detail."""
    lines = [f"| {name.capitalize()} | Measured | Limit | Met | Detail |", "|---|---|---|---|---|"]
    for g in goals:
        met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
        lines.append(f"| {g[name]} | {g['measured']} | {g['limit']} | {met} | {g['detail']} |")
    return lines


def conclude(
    results: dict[str, Any],
    started: float,
    name: str,
    evaluate: Callable[[dict[str, Any]], list[dict[str, Any]]],
    write: Callable[[dict[str, Any], Path], list[Path]],
    out_dir: Path,
    say: Callable[[str], None],
) -> None:
    """A benchmark's ending: its duration, its targets or goals (`name`: "target" or "goal") judged, the results
    written, and each verdict said."""
    results["duration_s"] = round(time.monotonic() - started, 1)
    results[f"{name}s"] = evaluate(results)
    paths = write(results, out_dir)
    for g in results[f"{name}s"]:
        say(f"{verdict(g['met'])} {g[name]}: {g['measured']} (limit {g['limit']})")
    say(f"done in {results['duration_s']} s: " + ", ".join(str(p) for p in paths))


def verdict(met: bool | None) -> str:
    """How a target or goal fared, padded for a column of them: MET, MISSED, or n/a (nothing measured)."""
    return "MET   " if met else "MISSED" if met is False else "n/a   "


def write_files(
    results: dict[str, Any],
    out_dir: Path,
    stem: str,
    to_markdown: Callable[[dict[str, Any]], str],
    chart: tuple[str, Callable[[dict[str, Any], Path], None]] | None = None,
) -> list[Path]:
    """STEM.json (every number), STEM.md (to_markdown's tables) and the chart (its file name, how to draw it), in
    out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(to_markdown(results), encoding="utf-8")
    if chart is not None:
        paths.append(out_dir / chart[0])
        chart[1](results, paths[-1])
    return paths


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "results", markdown, ("chart.png", chart))
