"""python -m bench.openai_stream: the cadence of the server's OpenAI-compatible stream (POST /v1/chat/completions,
stream=True) as the `openai` package's client sees it: how many tokens each chunk carries and the gaps between chunks,
with the reply channel (each piece of the reply sent as the module makes it) and without it (--poll-replies: the
server polls get_command_status, every 200 ms once text flows), beside raw llama-cpp-python's time per token on the
same model, threads and prompt, llama.cpp's llama-server --parallel 1 when --llama-server names it, and the module's
own speed in chats nobody follows closely (polled once a second). Then the parallel case: the module with
CPAI_MODULE_LLAMA_PARALLEL=--streams, that many streams at once, with and without the channel. The engines take turns,
each chat starting with nothing cached. Writes openai_stream.json and openai_stream.md into --out.

Goals (issue 23, with the channel): median gap ≤ 3 × raw's time per token, p95 gap ≤ 50 ms, ≤ 2 tokens per chunk;
stream tokens/s ≥ 0.97 × raw; first chunk ≤ the module's TTFT + 20 ms; in parallel the same per-stream cadence and an
aggregate ≥ 0.97 × the polled one's; median gap within 1.5 × llama-server's. Each stream is read through the `openai`
package, as users read it, and, as llama-server is, with json alone: the package's own work per chunk (~0.6 ms here)
runs on the cores llama.cpp computes on and slows any server's stream, so the speed goal is judged on the second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from tests.live_server import ROOT, running_server, server_status

from . import machine
from .console import say
from .cpai_client import CpaiClient
from .in_process import RawEngine
from .llama_server import LlamaServerEngine
from .module_bench import ModuleEngine
from .openai_client import OpenAIStreamEngine, PlainStreamEngine
from .stats import summary
from .workload import DEFAULT_MODEL, GENERATION_PROMPT, N_CTX, NO_CONVERSATION_CACHE, Settings

QUIET_POLL_S = 1.0  # the reference module chats: one status poll a second
POLLING = ("--poll-replies",)  # the server without the reply channel: "before"
GAP_GOAL = 3.0  # × raw's time per token
P95_GOAL_MS = 50.0
TOKENS_PER_CHUNK_GOAL = 2.0
SPEED_GOAL = 0.97  # × raw's tokens/s; in parallel, × the polled aggregate
TTFT_GAP_GOAL_MS = 20.0
LLAMA_SERVER_GOAL = 1.5  # × llama-server's median gap
ONE_TOKEN_A_CHUNK = ("raw", "llama_server")  # their streams: a chunk per token (time_stream counts chunks)
ENGINES = {
    "raw": "raw llama-cpp-python",
    "llama_server": "llama-server --parallel 1, read with json alone",
    "llama_server_openai": "llama-server --parallel 1, through the openai package",
    "polled": "ours before: polled (--poll-replies)",
    "channel": "ours after: reply channel",
    "channel_plain": "ours after: reply channel, read with json alone",
    "module_quiet": "module, polled once a second (reference)",
}
# Each of our streams against llama-server's read by the same client.
SAME_CLIENT = {"channel": "llama_server_openai", "polled": "llama_server_openai", "channel_plain": "llama_server"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openai_stream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every engine")
    parser.add_argument("--repeats", type=int, default=3, help="chats per engine")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per chat")
    parser.add_argument("--streams", type=int, default=4, help="parallel streams (and slots); 0 skips that part")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, to compare with")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small`, or pass --model PATH")
    if args.llama_server is not None and not args.llama_server.is_file():
        parser.error(f"--llama-server {args.llama_server}: no such file")
    if args.threads < 1 or min(args.repeats, args.tokens) < 2 or args.streams == 1 or args.streams < 0:
        parser.error("--threads must be at least 1, --repeats and --tokens at least 2, --streams 0 or at least 2")
    return args


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    return summary(run.get(key) for run in runs)["median"]


def _cell(runs: list[dict[str, Any]], key: str) -> str:
    s = summary(run.get(key) for run in runs)
    return "–" if s["median"] is None else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def _ratio(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 3) if part and whole else None


def _goal(name: str, value: float | None, limit: float, detail: str, at_most: bool = True) -> dict[str, Any]:
    """A goal in the shape every results file here uses: goal, measured, limit, met, detail (what was measured)."""
    met = value is not None and (value <= limit if at_most else value >= limit)
    return {
        "goal": name,
        "measured": value,
        "limit": f"{'≤' if at_most else '≥'} {limit:g}",
        "met": met,
        "detail": detail,
    }


def single_goals(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's goals for each of our two streams: the channel must meet them; the polled one shows why."""
    raw_gap, raw_speed = _median(runs["raw"], "gap_median_ms"), _median(runs["raw"], "tokens_per_second")
    goals = []
    for name in ("channel", "channel_plain", "polled"):
        stream, detail = runs[name], ENGINES[name]
        gap = _median(stream, "gap_median_ms")
        speed = _ratio(_median(stream, "tokens_per_second"), raw_speed)
        goals += [
            _goal("median gap ÷ raw time per token", _ratio(gap, raw_gap), GAP_GOAL, detail),
            _goal("p95 gap ms", _median(stream, "gap_p95_ms"), P95_GOAL_MS, detail),
            _goal("tokens per chunk", _median(stream, "tokens_per_chunk"), TOKENS_PER_CHUNK_GOAL, detail),
            _goal("stream tokens/s ÷ raw", speed, SPEED_GOAL, detail, at_most=False),
        ]
        if name != "channel_plain":  # its reader asks the module for nothing
            goals.append(
                _goal("first chunk − module TTFT, ms", _median(stream, "ttft_gap_ms"), TTFT_GAP_GOAL_MS, detail)
            )
        if server_gap := _median(runs.get(SAME_CLIENT[name], []), "gap_median_ms"):
            goal = "median gap ÷ llama-server's, read by the same client"
            goals.append(_goal(goal, _ratio(gap, server_gap), LLAMA_SERVER_GOAL, detail))
    return goals


def parallel_goals(runs: dict[str, list[dict[str, Any]]], streams: int) -> list[dict[str, Any]]:
    """With 4 chats in one batch each gets a token every few tens of ms: its cadence is measured against its own time
    per token (the module's tokens/s for that chat), as the single stream's is against raw's."""
    per_stream = [stream for run in runs["channel"] for stream in run["streams"]]
    polled_speed = _median(runs["polled"], "aggregate_tokens_per_second")
    for stream in per_stream:
        per_token_ms = 1000 / stream["module_tokens_per_second"] if stream.get("module_tokens_per_second") else None
        stream["gap_per_token"] = _ratio(stream.get("gap_median_ms"), per_token_ms)
        stream["p95_per_token"] = _ratio(stream.get("gap_p95_ms"), per_token_ms)
    detail = f"{streams} streams at once, reply channel"
    aggregate = _ratio(_median(runs["channel"], "aggregate_tokens_per_second"), polled_speed)
    return [
        _goal("median gap ÷ the stream's time per token", _median(per_stream, "gap_per_token"), GAP_GOAL, detail),
        _goal("p95 gap ÷ the stream's time per token", _median(per_stream, "p95_per_token"), GAP_GOAL, detail),
        _goal("tokens per chunk", _median(per_stream, "tokens_per_chunk"), TOKENS_PER_CHUNK_GOAL, detail),
        _goal("aggregate tokens/s ÷ polled", aggregate, SPEED_GOAL, detail, at_most=False),
    ]


def _goal_lines(goals: list[dict[str, Any]], detail: str) -> list[str]:
    return [
        f"- {g['goal']}: {g['measured']} (goal {g['limit']}): {'met' if g['met'] else 'NOT met'}"
        for g in goals
        if g["detail"] == detail
    ]


def cadence_table(results: dict[str, Any]) -> list[str]:
    """One stream at a time, per engine: the report's table and docs' figures."""
    runs = results["single"]
    lines = [
        "| engine | TTFT ms | tokens/s | chunks | tokens per chunk | median gap ms | p95 gap ms | module's TTFT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in ENGINES.items():
        if runs.get(name):
            cells = [
                _cell(runs[name], key)
                for key in ("ttft_ms", "tokens_per_second", "chunks", "tokens_per_chunk", "gap_median_ms", "gap_p95_ms")
            ]
            lines.append(f"| {label} | {' | '.join(cells)} | {_cell(runs[name], 'module_ttft_ms')} |")
    return lines


def report(results: dict[str, Any]) -> str:
    runs = results["single"]
    lines = [
        "# The OpenAI-compatible stream: its cadence",
        "",
        f"{results['started_utc']}, commit {results['commit']}, {results['machine']['cpu']} "
        f"({results['machine']['logical_cpus']} logical CPUs), model {results['model']}, {results['threads']} "
        f"threads, {results['tokens']} greedy tokens per chat, {results['repeats']} chats per engine taking turns, "
        f"1-minute load {results['load']['load_1min']} before. Medians (min–max) over the chats; a chat's gap is the "
        "median (or 95th percentile) of the gaps between its chunks that carry text, as the client reads them. "
        "TTFT: from the call to the first text.",
        "",
        *cadence_table(results),
        "",
    ]
    for name in ("channel", "channel_plain", "polled"):
        lines += [f"Goals, {ENGINES[name]}:", "", *_goal_lines(results["goals"], ENGINES[name]), ""]
    quiet = _median(runs["module_quiet"], "module_tokens_per_second")
    raw, channel = _median(runs["raw"], "tokens_per_second"), _median(runs["channel"], "module_tokens_per_second")
    lines += [
        f"- the module polled once a second ÷ raw: {_ratio(quiet, raw)}; the module's own tokens/s with the channel ÷ "
        f"that: {_ratio(channel, quiet)}",
        *_client_cost(runs),
        *_per_turn(runs),
        "",
    ]
    if results.get("parallel"):
        lines += _parallel_report(results)
    return "\n".join(lines)


def _client_cost(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What the `openai` package's own work per chunk costs a stream on the same cores: each server's tokens/s read
    through it ÷ read with json alone."""

    def speed(name: str) -> float | None:
        return _median(runs.get(name, []), "tokens_per_second")

    ours = _ratio(speed("channel"), speed("channel_plain"))
    theirs = _ratio(speed("llama_server_openai"), speed("llama_server"))
    return [
        f"- the openai package's share, tokens/s through it ÷ read with json alone: ours {ours}, "
        f"llama-server's {theirs}"
    ]


def _per_turn(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each stream's tokens/s ÷ raw's in the same turn, the median over the turns: a machine whose speed drifts during
    the run moves both alike."""
    raw = [run.get("tokens_per_second") for run in runs["raw"]]
    cells = []
    for name in ("channel", "channel_plain", "llama_server_openai", "llama_server", "polled"):
        ratios = [_ratio(run.get("tokens_per_second"), speed) for run, speed in zip(runs.get(name, []), raw)]
        if (median := summary(ratios)["median"]) is not None:
            cells.append(f"{ENGINES[name]} {median:.3f}")
    return [f"- tokens/s ÷ raw's in the same turn, median over the turns: {'; '.join(cells)}"]


def _parallel_report(results: dict[str, Any]) -> list[str]:
    runs, streams = results["parallel"], results["streams"]
    lines = [
        f"## {streams} streams at once (CPAI_MODULE_LLAMA_PARALLEL={streams})",
        "",
        "Per stream: medians over every stream of every round; aggregate: all streams' tokens over the time from the "
        "requests to the last chunk.",
        "",
        "| engine | tokens per chunk | median gap ms | p95 gap ms | stream tokens/s | aggregate tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("polled", "channel"):
        per_stream = [stream for run in runs[name] for stream in run["streams"]]
        cells = [_cell(per_stream, key) for key in ("tokens_per_chunk", "gap_median_ms", "gap_p95_ms")]
        cells += [_cell(per_stream, "tokens_per_second"), _cell(runs[name], "aggregate_tokens_per_second")]
        lines.append(f"| {ENGINES[name]} | {' | '.join(cells)} |")
    detail = f"{streams} streams at once, reply channel"
    return [*lines, "", f"Goals, {detail}:", "", *_goal_lines(results["goals"], detail), ""]


def _server(stack: ExitStack, args: argparse.Namespace, server_args: tuple[str, ...] = (), **env: str) -> str:
    return stack.enter_context(
        running_server(
            args.model,
            context_size=N_CTX,
            start_timeout=180,
            server_args=("--log-level", "warning", *server_args),
            CPAI_MODULE_LLAMA_THREADS=str(args.threads),
            **NO_CONVERSATION_CACHE,
            **env,
        )
    )


def _take_turns(engines: list[tuple[str, Any]], repeats: int, result: dict[str, list]) -> None:
    for i in range(repeats):
        # Turns alternate the engines' order, so a drift in the machine's speed touches them all alike.
        for name, run_chat in engines if i % 2 == 0 else engines[::-1]:
            run = run_chat()
            run.pop("text", None)
            if name in ONE_TOKEN_A_CHUNK:
                run.update(chunks=run["tokens"], tokens_per_chunk=1.0)
            result[name].append(run)
            say(f"{name} {i + 1}/{repeats}: {run.get('chunks', '-')} chunks, median gap {run.get('gap_median_ms')} ms")


def measure_single(args: argparse.Namespace, scratch: Path) -> dict[str, list[dict[str, Any]]]:
    """One stream at a time, the engines taking turns; the servers that are not chatting sit idle."""
    result: dict[str, list[dict[str, Any]]] = {name: [] for name in ENGINES}
    say(f"{args.threads} threads: starting the servers (channel, polled) and loading raw llama-cpp-python")
    with ExitStack() as stack:
        raw = RawEngine(args.model, args.threads)
        stack.callback(raw.close)
        channel_url, polled_url = _server(stack, args), _server(stack, args, POLLING)
        channel = OpenAIStreamEngine(channel_url, raw.llm.tokenize)
        channel_plain = PlainStreamEngine(channel_url)
        polled = OpenAIStreamEngine(polled_url, raw.llm.tokenize)
        quiet = ModuleEngine(
            CpaiClient(channel_url), Settings(poll_interval_s=QUIET_POLL_S), server_status(channel_url)["pid"]
        )
        engines: list[tuple[str, Any]] = [
            ("raw", raw),
            ("polled", polled),
            ("channel", channel),
            ("channel_plain", channel_plain),
        ]
        if args.llama_server:
            server = LlamaServerEngine(args.llama_server, args.model, args.threads, scratch / "llama-server.log")
            stack.callback(server.close)
            server_openai = OpenAIStreamEngine(f"http://127.0.0.1:{server.port}", raw.llm.tokenize)
            engines += [("llama_server", server), ("llama_server_openai", server_openai)]
        engines.append(("module_quiet", quiet))
        for _, engine in engines:  # warm-up: first-call costs (connections, a module's first chat) are not measured
            engine.chat(GENERATION_PROMPT, [], 8, fresh=True)
        tokens = args.tokens
        chats = [(name, lambda e=engine: e.chat(GENERATION_PROMPT, [], tokens, fresh=True)) for name, engine in engines]
        _take_turns(chats, args.repeats, result)
    return result


def _streams_at_once(engine: OpenAIStreamEngine, streams: int, tokens: int) -> dict[str, Any]:
    engine.flush()
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda _: engine.chat(GENERATION_PROMPT, [], tokens, fresh=False), range(streams)))
    elapsed = time.perf_counter() - started
    for run in runs:
        run.pop("text", None)
    return {
        "streams": runs,
        "aggregate_tokens_per_second": round(sum(run["tokens"] for run in runs) / elapsed, 2),
        "chunks": sum(run["chunks"] for run in runs),
        "gap_median_ms": _median(runs, "gap_median_ms"),
    }


def measure_parallel(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    result: dict[str, list[dict[str, Any]]] = {"polled": [], "channel": []}
    say(f"{args.streams} streams at once: starting the servers (channel, polled)")
    parallel = {"CPAI_MODULE_LLAMA_PARALLEL": str(args.streams)}
    with ExitStack() as stack:
        channel_url, polled_url = _server(stack, args, **parallel), _server(stack, args, POLLING, **parallel)
        vocabulary = Llama(str(args.model), vocab_only=True, verbose=False)  # to count the first chunk's tokens
        stack.callback(vocabulary.close)
        engines = []
        for name, url in (("polled", polled_url), ("channel", channel_url)):
            engine = OpenAIStreamEngine(url, vocabulary.tokenize)
            engine.chat(GENERATION_PROMPT, [], 8, fresh=True)  # warm-up
            engines.append((name, lambda e=engine: _streams_at_once(e, args.streams, args.tokens)))
        _take_turns(engines, args.repeats, result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    load = machine.wait_until_idle(args.wait_idle, say)
    results: dict[str, Any] = {
        **machine.provenance(),
        "load": load,
        "model": args.model.name,
        "threads": args.threads,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "streams": args.streams,
    }
    with tempfile.TemporaryDirectory(prefix="openai-stream-bench-") as scratch:
        results["single"] = measure_single(args, Path(scratch))
    results["goals"] = single_goals(results["single"])
    if args.streams:
        results["parallel"] = measure_parallel(args)
        results["goals"] += parallel_goals(results["parallel"], args.streams)
    text = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openai_stream.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "openai_stream.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
