"""bench.speculative's results as files: the raw JSON, a Markdown report with the goals and an estimate for
Mistral-7B, and a PNG chart."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import goals_table, write_files  # noqa: E402
from .stats import summary  # noqa: E402

ENGINES = ["raw", "module", "prompt_lookup", "llama_server", "llama_server_ngram"]
# A pass of Mistral-7B Q4_K_M on a CPU reads its 4.1 GB of weights once, however many tokens it holds; each token
# more in the batch adds its compute. That extra cost, as a part of a one-token pass, is about generation speed over
# prompt speed: ~10 against ~50 tokens/s on an 8-core AVX2 desktop, so 0.2 (0.1 to 0.3 across CPUs).
MISTRAL_EXTRA_TOKEN_COST = (0.1, 0.2, 0.3)


def _median(runs: list[dict[str, Any]], field: str) -> float | None:
    return summary(r[field] for r in runs)["median"]


def _geomean(values: list[float]) -> float | None:
    return round(math.exp(statistics.fmean(math.log(v) for v in values)), 3) if values else None


def _ratios(model: dict[str, Any], kind: str, engine: str, field: str = "tokens_per_second") -> list[float]:
    out = []
    for name, runs in model["prompts"].items():
        if name.startswith(kind) and engine in runs:
            a, b = _median(runs[engine], field), _median(runs["raw"], field)
            if a and b:
                out.append(a / b)
    return out


def _counts(model: dict[str, Any], kind: str) -> dict[str, int]:
    runs = [r for name, e in model["prompts"].items() if name.startswith(kind) for r in e["module"]]
    return {
        "generated": sum(r["tokens"] for r in runs),
        "drafted": sum(r["drafted_tokens"] for r in runs),
        "accepted": sum(r["accepted_tokens"] for r in runs),
    }


def _identical(model: dict[str, Any]) -> tuple[int, int]:
    pairs = [(e["module"][0]["text"], e["raw"][0]["text"]) for e in model["prompts"].values()]
    return sum(a == b for a, b in pairs), len(pairs)


def mistral_estimate(counts: dict[str, int], extra_cost: float) -> float | None:
    """Speed-up for a model whose passes cost the same whatever they hold, plus extra_cost per drafted token: the
    tokens over the passes they took (a pass per token not accepted) and the drafted tokens' compute."""
    passes = counts["generated"] - counts["accepted"]
    return round(counts["generated"] / (passes + extra_cost * counts["drafted"]), 2) if passes > 0 else None


def full_acceptance(model: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """By drafted tokens d: (c, the extra cost of a drafted token as a part of a one-token pass; the speed-up of a
    pass whose d drafts are all accepted, d + 1 tokens in the time of t(1 + d) / t(1) one-token steps)."""
    times = {int(size): ms for size, ms in model["pass_ms"].items()}
    one = times[1]
    return {
        size - 1: (round((ms - one) / one / (size - 1), 2), round(size * one / ms, 2))
        for size, ms in times.items()
        if size > 1
    }


def ceiling(model: dict[str, Any]) -> float | None:
    """The most any drafting can gain here within the module's longest draft: every draft accepted, at the best of
    the lengths measured (PASS_SIZES)."""
    gains = [gain for d, (_, gain) in full_acceptance(model).items() if d <= model["max_draft"]]
    return max(gains) if gains else None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for model in results["models"]:

        def goal(what: str, measured: float | None, limit: str, met: bool | None, detail: str, model=model) -> None:
            what = f"{model['model']}: {what}"
            out.append({"goal": what, "measured": measured, "limit": limit, "met": met, "detail": detail})

        grounded = _geomean(_ratios(model, "grounded", "module"))
        best = ceiling(model)
        bound = "" if best is None else f"; at most {best}× here, with every draft accepted"
        goal(
            "grounded tokens/s, module / raw",
            grounded,
            ">= 1.5",
            grounded and grounded >= 1.5,
            f"geometric mean{bound}",
        )
        open_ended = _geomean(_ratios(model, "open", "module"))
        goal("open-ended tokens/s, module / raw", open_ended, ">= 0.98", open_ended and open_ended >= 0.98, "")
        ttft = summary(_ratios(model, "", "module", "ttft_ms"))["median"]
        goal("time to first token, module / raw", ttft, "<= 1.02", ttft and ttft <= 1.02, "median over the prompts")
        same, total = _identical(model)
        goal("greedy text identical to raw", same, f"{total} of {total}", same == total, "see docs/speculative.md")
        for rival in ("prompt_lookup", "llama_server_ngram"):
            theirs = _geomean(_ratios(model, "grounded", rival))
            if theirs is not None and grounded is not None:
                goal(f"grounded: module ahead of {rival}", round(grounded / theirs, 3), "> 1", grounded > theirs, "")
    return out


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Speculative decoding by prompt lookup",
        "",
        f"`python -m bench.speculative`, commit {results['commit']}, {results['started_utc']}; "
        f"{results['machine']['cpu']}, "
        f"{results['settings']['threads']} threads, greedy, {results['settings']['tokens']} tokens at most, "
        f"{results['settings']['repeats']} repeats (medians), 1-minute load {results['load_start']['load_1min']} "
        "at the start. Engines in one process, in turns; tokens/s after the first token.",
        "",
        "## Goals",
        "",
        *goals_table(results["goals"]),
    ]
    for model in results["models"]:
        present = [e for e in ENGINES if any(e in runs for runs in model["prompts"].values())]
        lines += [
            "",
            f"## {model['model']} (drafts of up to {model['max_draft']} tokens{_capped(model)})",
            "",
            "| Prompt | " + " | ".join(f"{e} tok/s" for e in present) + " | module / raw | TTFT ms raw / module "
            "| accepted / drafted | same text |",
            "|---|" + "---|" * (len(present) + 4),
        ]
        for name, runs in model["prompts"].items():
            speeds = [_median(runs[e], "tokens_per_second") for e in present]
            ratio = speeds[1] / speeds[0] if speeds[0] and speeds[1] else None
            module = runs["module"]
            kept = f"{module[0]['accepted_tokens']} / {module[0]['drafted_tokens']}"
            same = "yes" if module[0]["text"] == runs["raw"][0]["text"] else "no"
            lines.append(
                f"| {name} | "
                + " | ".join(_cell(s) for s in speeds)
                + f" | {_cell(ratio, 2)} | {_cell(_median(runs['raw'], 'ttft_ms'), 0)} / "
                f"{_cell(_median(module, 'ttft_ms'), 0)} | {kept} | {same} |"
            )
        lines += _pass_table(model)
        lines += ["", "What the acceptance means for Mistral-7B on a CPU (an estimate on paper, not measured):", ""]
        for kind in ("grounded", "open"):
            counts = _counts(model, kind)
            estimates = ", ".join(f"{mistral_estimate(counts, c)}× at c = {c}" for c in MISTRAL_EXTRA_TOKEN_COST)
            lines.append(
                f"- {kind}: {counts['accepted']} of {counts['drafted']} drafted tokens accepted, "
                f"{counts['accepted']} of {counts['generated']} generated tokens needed no pass of their own: "
                f"{estimates}."
            )
    lines += [
        "",
        "c is the cost of a drafted token in a pass, as a part of a one-token pass (about generation speed over "
        "prompt speed); a 7B pass on a CPU is bound by reading the weights, so c is small there and the estimate "
        "counts passes. The speed-up is generated tokens / (passes + c × drafted tokens).",
        "",
    ]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        present = [e for e in ENGINES[1:] if any(e in runs for runs in model["prompts"].values())]
        width = 0.8 / len(present)
        for j, engine in enumerate(present):
            values = [_geomean(_ratios(model, kind, engine)) or 0 for kind in ("grounded", "open")]
            ax.bar([i + (j - (len(present) - 1) / 2) * width for i in range(2)], values, width, label=engine)
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_xticks(range(2), ["grounded", "open-ended"])
        ax.set_ylabel("tokens/s over raw llama-cpp-python")
        ax.set_title(model["model"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> list[Path]:
    return write_files(results, out_dir, "speculative", markdown, ("speculative.png", chart))


def _pass_table(model: dict[str, Any]) -> list[str]:
    rows = []
    for d, (c, gain) in full_acceptance(model).items():
        over = " (over the module's longest draft here)" if d > model["max_draft"] else ""
        rows.append(f"| {d} | {model['pass_ms'][str(d + 1)]} | {c} | {gain}×{over} |")
    return [
        "",
        f"What a pass costs here (a one-token step: {model['pass_ms']['1']} ms, "
        f"behind a {model['pass_context']}-token prompt):",
        "",
        "| drafted tokens d | pass ms | c: a drafted token's cost, part of a step | speed-up if all d are accepted |",
        "|---|---|---|---|",
        *rows,
    ]


def _capped(model: dict[str, Any]) -> str:
    asked = model.get("draft_tokens", model["max_draft"])  # runs before the probe asked for what they got
    return "" if asked == model["max_draft"] else f" of {asked} asked: the probe's cap on this machine"
