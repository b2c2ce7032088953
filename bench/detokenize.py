"""python -m bench.detokenize: what detokenizing costs a streamed reply. llama-cpp-python's streaming loop detokenizes
the whole reply so far after every token; LlamaChat's Llama (llama_chat._CountingLlama) does it from pieces
kept once asked for (llamachat/token_pieces.py). This streams the same greedy reply, of each length, from
llama-cpp-python's own Llama and from the module's, taking turns, and times the calls to detokenize within it: ms per
generated token, and their share of the reply's time. The end-of-sequence token is barred so that the reply runs to its
length (one that ends otherwise stops the bench).
Writes detokenize.json and detokenize.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from llama_cpp import Llama

from llama_chat import LlamaChat, plain_llama
from tests.live_server import ROOT

from . import machine
from .fit_time import default_model, say
from .report import goals_table
from .stats import summary
from .workload import GENERATION_PROMPT

LENGTHS = (256, 1024)
PERCENT_GOAL = 1.0  # the module's detokenizing: at most this much of a reply's time, at every length


def timed_reply(llm: Llama, tokens: int) -> dict[str, float]:
    """Streams a greedy reply of `tokens` tokens; the ms spent in detokenize per token, and its percentage of the
    reply's time."""
    spent = 0.0
    detokenize: Callable[..., bytes] = llm.detokenize

    def counted(*args: Any, **kwargs: Any) -> bytes:
        nonlocal spent
        started = time.perf_counter()
        try:
            return detokenize(*args, **kwargs)
        finally:
            spent += time.perf_counter() - started

    llm.detokenize = counted  # type: ignore[method-assign]  # the streaming loop calls self.detokenize
    llm.reset()
    messages = [{"role": "user", "content": GENERATION_PROMPT}]
    finish_reason = None
    started = time.perf_counter()
    try:
        stream = llm.create_chat_completion(
            messages=messages, max_tokens=tokens, temperature=0, stream=True, logit_bias={llm.token_eos(): -100.0}
        )
        for chunk in stream:
            finish_reason = chunk["choices"][0]["finish_reason"] or finish_reason
    finally:
        del llm.detokenize
    if finish_reason != "length":  # ended before `tokens` tokens: the time per token below would be wrong
        raise SystemExit(f"the reply ended ({finish_reason}) before {tokens} tokens")
    return {"ms_per_token": spent * 1000 / tokens, "percent": 100 * spent / (time.perf_counter() - started)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detokenize", description=__doc__)
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "threads": args.threads,
        "repeats": args.repeats,
        "load": machine.wait_until_idle(args.wait_idle, say),
    }
    n_ctx = max(LENGTHS) + 256
    module = LlamaChat.from_file(args.model, n_ctx=n_ctx, n_threads=args.threads)
    engines = {"llama_cpp_python": plain_llama(args.model, n_ctx, args.threads), "module": module.llm}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {str(n): {name: [] for name in engines} for n in LENGTHS}
    for length in LENGTHS:
        for i in range(args.repeats):
            for name, llm in list(engines.items())[:: 1 if i % 2 == 0 else -1]:  # turns, alternating their order
                runs[str(length)][name].append(timed_reply(llm, length))
                say(f"{length} tokens, {name} {i + 1}/{args.repeats}: {runs[str(length)][name][-1]}")
    engines["llama_cpp_python"].close()
    module.close()
    results["replies"] = {
        length: {
            name: {key: summary([run[key] for run in r]) for key in ("ms_per_token", "percent")}
            for name, r in by.items()
        }
        for length, by in runs.items()
    }
    results["goals"] = [
        {
            "goal": f"the module's detokenizing, % of a {length}-token reply's time",
            "measured": by["module"]["percent"]["median"],
            "limit": PERCENT_GOAL,
            "met": by["module"]["percent"]["median"] <= PERCENT_GOAL,
            "detail": f"llama-cpp-python's: {by['llama_cpp_python']['percent']['median']} % "
            f"({by['llama_cpp_python']['ms_per_token']['median']} ms per token against the module's "
            f"{by['module']['ms_per_token']['median']})",
        }
        for length, by in results["replies"].items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detokenize.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "detokenize.md").write_text(
        f"# Detokenizing a streamed reply: {results['started_utc']}, commit {results.get('commit', 'not recorded')}\n\n"
        f"{args.model.name}, {args.threads} thread(s), greedy replies of {', '.join(map(str, LENGTHS))} tokens, "
        f"{args.repeats} each per Llama, taking turns; 1-minute load at the start {results['load']['load_1min']}.\n\n"
        + "\n".join(goals_table(results["goals"]))
        + "\n"
    )
    say(json.dumps(results["goals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
