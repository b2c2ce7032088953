"""python -m bench: measures, in one run on one GGUF with the same threads and prompts, raw llama-cpp-python, the
LlamaChat wrapper, the module through our standalone server as a client sees it (its own protocol, and its
OpenAI-compatible stream), and optionally llama.cpp's llama-server; writes results.json, results.md and chart.png into
--out.
"""

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.live_server import ROOT, running_server, server_status

from . import machine, report
from .console import say
from .cpai_client import CpaiClient
from .in_process import RawEngine, WrapperEngine
from .llama_server import LlamaServerEngine
from .measure import measure_conversation, measure_generation
from .memory import raw_rss_curve
from .module_bench import ModuleEngine, cancel_during_generation, cancel_during_prompt, measure_memory
from .openai_client import OpenAIStreamEngine
from .workload import CONVERSATION, DEFAULT_MODEL, N_CTX, NO_CONVERSATION_CACHE, Settings, long_prompt

# Engines measured in generation only: the OpenAI stream's conversation would be the module's again (same process,
# same cache), seen through another client.
GENERATION_ONLY = ("openai_stream",)


def parse_args(argv=None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--threads", type=int, default=d.threads, help="CPU threads for every engine")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=d.poll_interval_s * 1000,
        help="the client's pause between status polls (the Explorer page's is 250 ms)",
    )
    parser.add_argument("--repeats", type=int, default=d.repeats, help="repeats of the generation measurement")
    parser.add_argument("--generation-tokens", type=int, default=d.generation_tokens, help="tokens per generation run")
    parser.add_argument("--conversation-repeats", type=int, default=d.conversation_repeats)
    parser.add_argument(
        "--conversation-turns",
        type=int,
        default=d.conversation_turns,
        choices=range(1, len(CONVERSATION) + 1),
        metavar=f"1..{len(CONVERSATION)}",
    )
    parser.add_argument("--conversation-tokens", type=int, default=d.conversation_tokens, help="tokens per reply")
    parser.add_argument("--cancel-repeats", type=int, default=d.cancel_repeats)
    parser.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=d.long_prompt_tokens,
        help="size of the prompt cancelled while it is being read",
    )
    parser.add_argument("--memory-chats", type=int, default=d.memory_chats, help="chats between the RSS readings")
    parser.add_argument("--memory-chat-tokens", type=int, default=d.memory_chat_tokens)
    parser.add_argument("--llama-server", type=Path, help="path to llama.cpp's llama-server binary, to compare with")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small` for SmolLM2-135M, or pass --model PATH")
    if args.llama_server is not None and not args.llama_server.is_file():
        parser.error(f"--llama-server {args.llama_server}: no such file")
    for name in (
        "threads",
        "repeats",
        "generation_tokens",
        "conversation_repeats",
        "conversation_tokens",
        "cancel_repeats",
        "long_prompt_tokens",
        "memory_chats",
        "memory_chat_tokens",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.poll_ms <= 0:
        parser.error("--poll-ms must be more than 0")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        repeats=args.repeats,
        conversation_repeats=args.conversation_repeats,
        conversation_turns=args.conversation_turns,
        generation_tokens=args.generation_tokens,
        conversation_tokens=args.conversation_tokens,
        long_prompt_tokens=args.long_prompt_tokens,
        cancel_repeats=args.cancel_repeats,
        memory_chats=args.memory_chats,
        memory_chat_tokens=args.memory_chat_tokens,
        poll_interval_s=args.poll_ms / 1000,
        threads=args.threads,
    )


def start_engines(args: argparse.Namespace, settings: Settings, scratch: Path, stack: ExitStack) -> dict[str, Any]:
    """Every engine loaded at once, each stopped when the stack closes; idle ones take no CPU."""
    say("loading raw llama-cpp-python and the LlamaChat wrapper")
    raw = RawEngine(args.model, settings.threads)
    stack.callback(raw.close)
    wrapper = WrapperEngine(args.model, settings.threads)
    stack.callback(wrapper.close)
    say("starting python -m llamachat_server with the module")
    base_url = stack.enter_context(
        running_server(
            args.model,
            context_size=N_CTX,
            start_timeout=180,
            server_args=("--log-level", "warning"),
            CPAI_MODULE_LLAMA_THREADS=str(settings.threads),
            **NO_CONVERSATION_CACHE,
        )
    )
    client = CpaiClient(base_url)
    stack.callback(client.close)
    engines = {
        "raw": raw,
        "wrapper": wrapper,
        "module": ModuleEngine(client, settings, server_status(base_url)["pid"]),
        "openai_stream": OpenAIStreamEngine(base_url, raw.llm.tokenize),  # the same server, the same module
    }
    if args.llama_server:
        say(f"starting {args.llama_server}")
        engines["llama_server"] = LlamaServerEngine(
            args.llama_server, args.model, settings.threads, scratch / "llama-server.log"
        )
        stack.callback(engines["llama_server"].close)
    return engines


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    started = time.monotonic()
    say(f"model {args.model}, {settings.threads} threads; results go to {args.out}")
    load = {"start": machine.wait_until_idle(args.wait_idle, say), "phases": {}}
    phases = load["phases"]
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "model_mb": round(args.model.stat().st_size / 2**20, 1),
        "n_ctx": N_CTX,
        "settings": vars(settings).copy(),
        "load": load,
        "llama_server": {"skipped": "no --llama-server PATH given"},
    }

    with tempfile.TemporaryDirectory(prefix="llamachat-bench-") as scratch, ExitStack() as stack:
        engines = start_engines(args, settings, Path(scratch), stack)
        for key in engines:
            results[key] = {}
        module = engines["module"]
        # Counted with the model's own tokenizer, so the prompt really is that long.
        prompt = long_prompt(
            settings.long_prompt_tokens, lambda text: len(engines["raw"].llm.tokenize(text.encode(), add_bos=False))
        )

        with machine.phase(phases, "memory"):  # first, so that "after loading" is before any chat
            say(f"module memory over {settings.memory_chats} chats")
            results["module"]["memory"] = measure_memory(module, settings)
            say(
                "raw llama-cpp-python memory over the same chats, in a process of its own, then again with "
                "gc.collect() after each chat"
            )
            results["raw"]["memory"] = raw_rss_curve(args.model, settings)
            results["raw"]["memory_gc_each_chat"] = raw_rss_curve(args.model, settings, collect_each_chat=True)
        with machine.phase(phases, "generation"):
            say(f"generation, {settings.repeats} repeats, engines taking turns: {', '.join(engines)}")
            for key, part in measure_generation(engines, settings).items():
                results[key]["generation"] = part
        with machine.phase(phases, "conversation"):
            say(f"{settings.conversation_turns}-turn conversation, {settings.conversation_repeats} repeats")
            conversing = {key: engine for key, engine in engines.items() if key not in GENERATION_ONLY}
            for key, part in measure_conversation(conversing, settings).items():
                results[key]["conversation"] = part
        with machine.phase(phases, "cancel"):
            say("module cancel latency, during generation and during a long prompt")
            results["module"]["cancel_generation"] = cancel_during_generation(module, settings)
            results["module"]["cancel_prompt"] = cancel_during_prompt(module, settings, prompt)
            results["module"]["long_prompt_tokens"] = results["module"]["cancel_prompt"]["runs"][0]["prompt_tokens"]
        if "llama_server" in engines:
            results["llama_server"]["binary"] = str(args.llama_server)

    report.conclude(results, started, "target", report.evaluate_targets, report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
