"""python -m bench.token_count: what counting the generated tokens costs. The wrapper's Llama
counts each sampled token in an override of sample(); this generates the same greedy reply with llama-cpp-python's
own Llama and with the wrapper's, taking turns, and compares tokens per second. Writes token_count.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from llama_chat import _CountingLlama
from tests.live_server import ROOT

from . import machine
from .fit_time import default_model, say
from .stats import summary
from .workload import GENERATION_PROMPT

TOKENS = 200


def tokens_per_second(llm: Llama) -> float:
    """Tokens per second over a greedy reply of TOKENS tokens after a prompt already in the KV cache."""
    messages = [{"role": "user", "content": GENERATION_PROMPT}]
    stream = llm.create_chat_completion(messages=messages, max_tokens=TOKENS, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    return (TOKENS - 1) / (time.perf_counter() - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.token_count", description=__doc__)
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "tokens": TOKENS,
        "threads": args.threads,
        "repeats": args.repeats,
        "load": machine.wait_until_idle(args.wait_idle, say),
    }
    engines = {
        name: cls(
            model_path=str(args.model), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
        )
        for name, cls in (("llama_cpp_python", Llama), ("counting", _CountingLlama))
    }
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        engines["counting"].generated_tokens = 0
        for name, llm in engines.items():  # taking turns, so a change in the machine's load hits both alike
            speeds[name].append(tokens_per_second(llm))
    counted = engines["counting"].generated_tokens
    if counted != TOKENS:  # the same greedy reply from both: if it ended early, tokens/s above is wrong for both
        raise SystemExit(f"the reply ended after {counted} tokens, before {TOKENS}: use a prompt for a longer text")
    for llm in engines.values():
        llm.close()
    results["tokens_per_second"] = {name: summary(values) for name, values in speeds.items()}
    base, counting = (results["tokens_per_second"][k]["median"] for k in ("llama_cpp_python", "counting"))
    results["counting_over_plain"] = round(counting / base, 3)
    results["tokens_counted_last_reply"] = counted
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_count.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "token_count.md").write_text(
        f"# Counting generated tokens: {results['started_utc']}, commit {results.get('commit', 'not recorded')}\n\n"
        f"{args.model.name}, {args.threads} thread(s), greedy {TOKENS}-token replies, {args.repeats} runs each, taking "
        f"turns; 1-minute load at the start {results['load']['load_1min']}.\n\n"
        "| Llama | tokens/s median (min-max) |\n|---|---|\n"
        + "".join(
            f"| {name} | {s['median']} ({s['min']}-{s['max']}) |\n" for name, s in results["tokens_per_second"].items()
        )
        + f"\nWith the count / without: {results['counting_over_plain']} "
        f"(the last reply counted {counted} of {TOKENS} tokens).\n"
    )
    say(f"tokens/s {results['tokens_per_second']}; with the count / without: {results['counting_over_plain']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
