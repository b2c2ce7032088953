"""python -m bench.openai_stream: the server's OpenAI-compatible stream (POST /v1/chat/completions, stream=True) as
the `openai` package's client sees it, beside the module's own figures for the same chats and raw llama-cpp-python
on the same model, threads and prompt; and, to tell the stream's own cost from the machine's, the module's own speed
in chats that nobody follows closely (polled once a second). The engines take turns, each chat starting with nothing
cached. Writes openai_stream.json and openai_stream.md into --out.

Goals: those of bench/openai_client.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from llamachat_server.openai_api import DUE_INTERVAL, FIRST_TEXT_INTERVAL, REPLY_INTERVAL
from tests.live_server import ROOT, running_server, server_status

from . import machine
from .console import say
from .cpai_client import CpaiClient
from .in_process import RawEngine
from .module_bench import ModuleEngine
from .openai_client import SPEED_GOAL, TTFT_GAP_GOAL_MS, OpenAIStreamEngine
from .stats import summary
from .workload import DEFAULT_MODEL, GENERATION_PROMPT, N_CTX, NO_CONVERSATION_CACHE, Settings

QUIET_POLL_S = 1.0  # the reference module chats: one status poll a second, ~0.3 % of the stream's five


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openai_stream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF both engines load")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="CPU threads for both engines, one measurement each (1 leaves a core of 2 to the server and the client)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="chats per engine")
    parser.add_argument(
        "--tokens", type=int, default=512, help="tokens per chat (a long reply: the last chunk comes up to a poll late)"
    )
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small`, or pass --model PATH")
    if min(args.threads) < 1 or min(args.repeats, args.tokens) < 2:
        parser.error("--threads must be at least 1, --repeats and --tokens at least 2")
    return args


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    return summary(run[key] for run in runs)["median"]


def _cell(runs: list[dict[str, Any]], key: str) -> str:
    s = summary(run.get(key) for run in runs)
    return "–" if s["median"] is None else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def _ratio(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 3) if part and whole else None


def _section(threads: int, result: dict[str, Any], tokens: int) -> list[str]:
    """One thread count's table and goals; sets result["goals"]."""
    raw, stream, quiet = result["raw"], result["openai_stream"], result["module_quiet"]
    raw_speed, speed = _median(raw, "tokens_per_second"), _median(stream, "tokens_per_second")
    quiet_speed = _median(quiet, "module_tokens_per_second")
    gap = _median(stream, "ttft_gap_ms")
    ratio = speed / raw_speed if speed and raw_speed else None
    goals = result["goals"] = {
        "ttft_gap_ms": gap,
        "ttft_gap_met": gap is not None and gap <= TTFT_GAP_GOAL_MS,
        "speed_ratio": round(ratio, 3) if ratio else None,
        "speed_met": ratio is not None and ratio >= SPEED_GOAL,
    }
    return [
        f"## {threads} thread{'s' if threads > 1 else ''}",
        "",
        "| engine | TTFT ms | tokens/s | module's own TTFT ms | module's own tokens/s |",
        "|---|---|---|---|---|",
        f"| raw llama-cpp-python | {_cell(raw, 'ttft_ms')} | {_cell(raw, 'tokens_per_second')} | – | – |",
        f"| openai client, streamed from /v1/chat/completions | {_cell(stream, 'ttft_ms')} | "
        f"{_cell(stream, 'tokens_per_second')} | {_cell(stream, 'module_ttft_ms')} | "
        f"{_cell(stream, 'module_tokens_per_second')} |",
        f"| module, polled once a second (reference) | – | – | {_cell(quiet, 'module_ttft_ms')} | "
        f"{_cell(quiet, 'module_tokens_per_second')} |",
        "",
        f"- client TTFT − module TTFT: {gap} ms (goal ≤ {TTFT_GAP_GOAL_MS:g} ms): "
        f"{'met' if goals['ttft_gap_met'] else 'NOT met'}",
        f"- stream tokens/s ÷ raw: {goals['speed_ratio']} (goal ≥ {SPEED_GOAL}): "
        f"{'met' if goals['speed_met'] else 'NOT met'}",
        f"- chunks per chat: {_median(stream, 'chunks')} for {tokens} tokens",
        f"- the module polled once a second ÷ raw: {_ratio(quiet_speed, raw_speed)}; stream ÷ that module: "
        f"{_ratio(speed, quiet_speed)} (what the stream's polls and chunks cost)",
        "",
    ]


def report(results: dict[str, Any]) -> str:
    lines = [
        "# The OpenAI-compatible stream",
        "",
        f"{results['when']}, {results['machine']['cpu']} ({results['machine']['logical_cpus']} logical CPUs), "
        f"model {results['model']}, {results['tokens']} tokens per chat, {results['repeats']} chats per engine "
        f"taking turns, 1-minute load {results['load']['load_1min']} before. Medians (min–max). TTFT: from the call "
        f"to the first text the client reads. The server sends what is new at each status poll of the module: every "
        f"{FIRST_TEXT_INTERVAL * 1000:g} ms until the first text, then every {REPLY_INTERVAL * 1000:g} ms, and every "
        f"{DUE_INTERVAL * 1000:g} ms once max_tokens is due at the module's speed.",
        "",
    ]
    for threads, result in results["by_threads"].items():
        lines += _section(int(threads), result, results["tokens"])
    return "\n".join(lines)


def measure(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The engines on `threads` threads, taking turns."""
    result: dict[str, Any] = {"raw": [], "openai_stream": [], "module_quiet": []}
    say(f"{threads} threads: starting the server with the module, and loading raw llama-cpp-python")
    raw = RawEngine(args.model, threads)
    try:
        with running_server(
            args.model,
            context_size=N_CTX,
            start_timeout=180,
            server_args=("--log-level", "warning"),
            CPAI_MODULE_LLAMA_THREADS=str(threads),
            **NO_CONVERSATION_CACHE,
        ) as base_url:
            stream = OpenAIStreamEngine(base_url, raw.llm.tokenize)
            quiet = ModuleEngine(
                CpaiClient(base_url), Settings(poll_interval_s=QUIET_POLL_S), server_status(base_url)["pid"]
            )
            stream.chat(
                GENERATION_PROMPT, [], 8, fresh=True
            )  # warm-up: first-call costs (connections, the module's first chat) are not measured
            raw.chat(GENERATION_PROMPT, [], 8, fresh=True)
            engines = [("raw", lambda: raw.chat(GENERATION_PROMPT, [], args.tokens, fresh=True))]
            engines.append(("openai_stream", lambda: stream.chat(GENERATION_PROMPT, [], args.tokens, fresh=True)))
            engines.append(("module_quiet", lambda: quiet.chat(GENERATION_PROMPT, [], args.tokens, fresh=True)))
            for i in range(args.repeats):
                # Turns alternate the engines' order, so a drift in the machine's speed touches them all alike.
                for name, run_chat in engines if i % 2 == 0 else engines[::-1]:
                    run = run_chat()
                    run.pop("text", None)
                    result[name].append(run)
                    speed = run["tokens_per_second"] or 0.0
                    say(f"{name} {i + 1}/{args.repeats}: TTFT {run['ttft_ms']:.0f} ms, {speed:.1f} tokens/s")
    finally:
        raw.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    load = machine.wait_until_idle(args.wait_idle, say)
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "load": load,
        "model": args.model.name,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "by_threads": {},
    }
    for threads in args.threads:
        results["by_threads"][str(threads)] = measure(args, threads)
    text = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai_stream.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "openai_stream.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
