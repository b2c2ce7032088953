"""python -m bench.speculative: speculative decoding by prompt lookup (llamachat/prompt_lookup.py) against raw
llama-cpp-python, on grounded tasks (replies that repeat their prompt) and open-ended chat (speculative_prompts.py).

Engines, in this process on the same GGUF and threads, greedy, each prompt evaluated from an empty cache:
- raw: llama-cpp-python's create_chat_completion, streamed;
- module: LlamaChat.do_chat, the layer the module's runner streams, with CPAI_MODULE_LLAMA_DRAFT_TOKENS' default;
- prompt_lookup: llama-cpp-python with its LlamaPromptLookupDecoding draft model (which needs logits_all);
and with --llama-server PATH, llama.cpp's llama-server without and with --spec-type ngram-simple (its prompt lookup),
over its streaming HTTP API. Every engine gets the module's chat template and messages, so the greedy texts compare.
Engines take turns within each prompt of each repeat; the results name the commit they measured.

Before the chats, what a pass costs with the module's Llama: a batch of the last token and d drafted ones against a
one-token step, behind a grounded prompt. That bounds what any drafting can gain on this machine and model: a pass
whose d drafts are all accepted yields d + 1 tokens in the time of t(1 + d) / t(1) one-token steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from llama_chat import LlamaChat, conversation, plain_llama
from llamachat.chat_template import choose_template
from llamachat.thread_policy import default_max_threads
from tests.live_server import ROOT

from . import machine, speculative_report
from .console import say
from .llama_server import LlamaServerEngine
from .report import conclude
from .speculative_prompts import GROUNDED, OPEN_ENDED
from .stream_timing import time_stream
from .workload import DEFAULT_MODEL, N_CTX, SAMPLING, SYSTEM_PROMPT

Run = Callable[[str, int], dict[str, Any]]  # (prompt, max_tokens) -> a timed stream's fields


def raw_engine(model: Path, threads: int, draft_model: Any = None) -> tuple[Run, Callable[[], None]]:
    """llama-cpp-python's own chat completion, on the module's chat template (and messages, as conversation() makes
    them); with a draft_model, llama-cpp-python's speculative decoding."""
    llm = plain_llama(model, N_CTX, threads, draft_model=draft_model)
    template = choose_template(llm, None).template
    llm.chat_handler = chat_formatter_to_chat_completion_handler(template)
    system_role = template.supports_system_role()

    def run(prompt: str, max_tokens: int) -> dict[str, Any]:
        llm.reset()
        messages: list[Any] = conversation(prompt, SYSTEM_PROMPT, None, system_role)
        stream = lambda: llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, **SAMPLING)  # noqa: E731
        return vars(time_stream(stream))

    return run, llm.close


def module_engine(chat: LlamaChat) -> tuple[Run, Callable[[], None]]:
    def run(prompt: str, max_tokens: int) -> dict[str, Any]:
        chat.llm.reset()
        timed = time_stream(
            lambda: chat.do_chat(prompt, SYSTEM_PROMPT, stream=True, max_tokens=max_tokens, **SAMPLING)  # type: ignore[arg-type, return-value]
        )
        return {**vars(timed), "drafted_tokens": chat.drafted_tokens, "accepted_tokens": chat.accepted_tokens}

    return run, chat.close


def server_engine(binary: Path, model: Path, threads: int, log: Path, *args: str) -> tuple[Run, Callable[[], None]]:
    server = LlamaServerEngine(binary, model, threads, log, extra_args=args)
    # /v1/chat/completions with the module's messages: llama-server renders them with the GGUF's own template (a
    # GGUF without one gets llama-server's default, so only its speed compares there).
    return (lambda prompt, max_tokens: server.chat(prompt, [], max_tokens, fresh=True)), server.close


PASS_SIZES = (1, 2, 3, 5, 9, 17)  # tokens in a pass: the last token and 0, 1, 2, 4, 8, 16 drafted ones
PASS_REPEATS = 20
PASS_CONTEXT = 200  # tokens already in the KV cache, about a grounded prompt's length


def pass_costs(chat: LlamaChat) -> dict[str, float]:
    """Median milliseconds of a pass of each size in PASS_SIZES, logits at every position (as a verification asks),
    behind PASS_CONTEXT tokens of a grounded prompt; the sizes take turns within each repeat."""
    llm = chat.llm
    text = next(iter(GROUNDED.values())).encode()
    needed = PASS_CONTEXT + max(PASS_SIZES)
    tokens = llm.tokenize(text * (1 + needed // len(llm.tokenize(text))))
    assert len(tokens) >= needed, f"{len(tokens)} tokens for passes that need {needed}"
    samples: dict[int, list[float]] = {size: [] for size in PASS_SIZES}
    for _ in range(PASS_REPEATS):
        for size in PASS_SIZES:
            llm.reset()
            llm.eval(tokens[:PASS_CONTEXT])
            started = time.perf_counter()
            llm._decode_outputs(tokens[PASS_CONTEXT : PASS_CONTEXT + size], size)
            samples[size].append((time.perf_counter() - started) * 1000)
    llm.reset()
    return {str(size): round(statistics.median(times), 2) for size, times in samples.items()}


def measure(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> dict[str, Any]:
    prompts = {**{f"grounded/{k}": v for k, v in GROUNDED.items()}, **{f"open/{k}": v for k, v in OPEN_ENDED.items()}}
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in prompts}
    with ExitStack() as stack:
        engines: dict[str, Run] = {}

        def add(name: str, made: tuple[Run, Callable[[], None]]) -> None:
            engines[name] = made[0]
            stack.callback(made[1])

        add("raw", raw_engine(model, args.threads))
        # Drafts as long as the module's probe allows on this machine (docs/speculative.md): chat.max_draft.
        chat = LlamaChat.from_file(model, n_ctx=N_CTX, n_threads=args.threads, max_draft=args.draft_tokens)
        add("module", module_engine(chat))
        pass_ms = pass_costs(chat)
        say(f"{model.name}: pass ms by tokens in it {pass_ms}")
        add("prompt_lookup", raw_engine(model, args.threads, LlamaPromptLookupDecoding()))
        if args.llama_server:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            add("llama_server", server_engine(args.llama_server, model, args.threads, logs / "plain.log"))
            ngram = ("--spec-type", "ngram-simple")
            add("llama_server_ngram", server_engine(args.llama_server, model, args.threads, logs / "ngram.log", *ngram))
        names = list(engines)
        for repeat in range(args.repeats):
            for i, (name, prompt) in enumerate(prompts.items()):
                turn = i + repeat
                for engine in names[turn % len(names) :] + names[: turn % len(names)]:  # each engine leads in turn
                    rows[name].setdefault(engine, []).append(engines[engine](prompt, args.tokens))
            say(f"{model.name}: repeat {repeat + 1} of {args.repeats} done")
    return {
        "model": model.name,
        "draft_tokens": args.draft_tokens,
        "max_draft": chat.max_draft,
        "pass_ms": pass_ms,
        "pass_context": PASS_CONTEXT,
        "prompts": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.speculative", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, nargs="+", default=[DEFAULT_MODEL], help="the GGUF(s) measured")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every reply")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=default_max_threads(), help="CPU threads of every engine")
    parser.add_argument(
        "--draft-tokens", type=int, default=16, help="the module's CPAI_MODULE_LLAMA_DRAFT_TOKENS (its docs' value)"
    )
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary (with --spec-type)")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "speculative",
        **machine.provenance(),
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "threads": args.threads, **SAMPLING},
        "load_start": machine.wait_until_idle(args.wait_idle, say),
        "phases": {},
        "models": [],
    }
    for model in args.model:
        with machine.phase(results["phases"], model.name):
            results["models"].append(measure(args, model, results))
    conclude(results, started, "goal", speculative_report.goals, speculative_report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
