"""python -m bench.conversations: users taking turns in their own conversations, and what the conversation cache
(conversation_cache.py) does for a returning user's time to first token, against the module without it (today: only
the live context is reused) and against the same request cold, all in one run on one GGUF.

- N users (2, 4, 8) take turns, 10 turns each (greedy, 32-token replies), on the module with the cache (its RAM
  tier sized by --ram-mb, so that 8 conversations do not fit and the disk tier serves them). At turn 2 and the
  last, each request is also sent to the module without the cache (a returning user as today) and, after a chat with
  another system prompt, cold (its first token only). TTFT is the module's own figure (from the chat's start to its
  first token), so the poll interval is no part of it.
- After the module restarts (the same cache folder), each of the 8 users' next turn, against the same request cold.
- One user alone, 10 turns, with and without the cache: the cost of saving after every chat (--single-repeats).
- 500 one-turn conversations into a small disk tier (--disk-mb): its folder never grows past its bound.
- In process: the model's KV bytes per token, and restore throughput from RAM and from disk (read, checked,
  restored), against evaluating the same tokens.
- Optionally llama-server --parallel 4 (--llama-server PATH) on the same alternation, prompt caching on.

The two modules run side by side (an idle one takes no CPU), each with --threads threads; results name the commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import llama_cpp

from llama_chat import LlamaChat
from llamachat.conversation_cache import ConversationCache
from llamachat.kv_state import fingerprint
from llamachat.thread_policy import default_max_threads
from tests.live_server import ROOT, poll, rss_mb, running_server, server_status

from . import conversations_report, machine
from .cpai_client import ChatFailed, CpaiClient
from .llama_server import LlamaServerEngine
from .module_bench import chat_fields
from .report import conclude
from .stats import summary
from .workload import (
    CONVERSATION,
    DEFAULT_MODEL,
    FLUSH_PROMPT,
    FLUSH_SYSTEM_PROMPT,
    N_CTX,
    NO_CONVERSATION_CACHE,
    SAMPLING,
    SYSTEM_PROMPT,
    chat_messages,
)

NAMES = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana"]
USERS = [2, 4, 8]
COMPARED_TURNS = (1,)  # 0-based turns, besides the last, that are also sent to the module without the cache
RESTART_PROMPT = "Thank you. Is there anything else I should know?"


def say(text: str) -> None:
    print(f"[bench.conversations {time.strftime('%H:%M:%S')}] {text}", flush=True)


def first_prompt(user: int) -> str:
    """Each user's conversation differs from its first message on."""
    return f"My name is {NAMES[user]}. {CONVERSATION[0]}"


def prompt_of(user: int, turn: int) -> str:
    return first_prompt(user) if turn == 0 else CONVERSATION[turn]


class Module:
    """The module behind our server, chatted with as a client; the module's own figures are read from the end."""

    def __init__(self, base_url: str, poll_s: float) -> None:
        self.base_url, self.poll_s = base_url, poll_s
        self.client = CpaiClient(base_url)
        self.chats = 0

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, system_prompt: str = SYSTEM_PROMPT):
        trace = self.client.chat(chat_fields(prompt, history, max_tokens, system_prompt), self.poll_s)
        self.chats += 1
        final = trace.final
        if not final.get("success"):
            raise ChatFailed(f"the chat failed: {final.get('error') or final}")
        return {
            "ttft_ms": final["time_to_first_token_ms"],
            "client_ttft_ms": trace.client_ttft_ms(),
            "prompt_tokens": final["prompt_tokens"],
            "cached_tokens": final["cached_tokens"],
            "prefix_source": final.get("prefix_source"),
            "restore_ms": final.get("restore_ms"),
            "reply": final["reply"],
        }

    def cold(self, prompt: str, history: list[dict[str, str]]) -> dict[str, Any]:
        """The request's first token from a context holding nothing of it (a module without the cache only)."""
        self.chat(FLUSH_PROMPT, [], 1, FLUSH_SYSTEM_PROMPT)
        return self.chat(prompt, history, 1)

    def status(self) -> dict[str, Any]:
        return server_status(self.base_url)

    def cache_stats(self, on_disk: int | None = None) -> dict[str, Any]:
        """The conversation cache's figures once they count every chat sent and, where on_disk is given, that many
        conversations saved to disk (kept or evicted): the module reports its status every few seconds, and saves a
        conversation after its chat has ended, so a fast machine reads them before they settle."""

        def settled() -> dict[str, Any] | None:
            stats = self.status()["statusData"]["conversationCache"]
            counted = sum(stats["prefixSources"].values()) == self.chats
            saved = on_disk is None or stats["diskEntries"] + stats["evictedFromDisk"] == on_disk
            return stats if counted and saved else None

        return poll(settled, 60, "the module's status to count every chat and saved conversation")

    def close(self) -> None:
        self.client.close()


def alternate(modules: dict[str, Module], users: int, turns: int, tokens: int, server=None) -> dict[str, Any]:
    """users take turns on the cached module; some turns also go to today's module and cold. Histories are the
    cached module's replies, so every engine gets the same requests."""
    cached, today = modules["cached"], modules["today"]
    histories: list[list[dict[str, str]]] = [[] for _ in range(users)]
    rows = []
    for turn in range(turns):
        for user in range(users):
            prompt, history = prompt_of(user, turn), histories[user]
            row = {"turn": turn + 1, "user": user, "cached": cached.chat(prompt, history, tokens)}
            if turn in COMPARED_TURNS or turn == turns - 1:
                row["today"] = today.chat(prompt, history, tokens)
                row["cold"] = today.cold(prompt, history)
                if server is not None:
                    row["llama_server"] = server_ttft(server, prompt, history, tokens)
            rows.append(row)
            histories[user] = history + [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": row["cached"]["reply"]},
            ]
    for row in rows:  # the replies only fed the histories
        for part in row.values():
            if isinstance(part, dict):
                part.pop("reply", None)
    return {"rows": rows, "histories": histories}


def server_ttft(server: LlamaServerEngine, prompt: str, history: list[dict[str, str]], tokens: int) -> dict:
    """llama-server's own prompt time and the client's first token, prompt caching on (its slots keep prefixes)."""
    body = {
        "messages": chat_messages(prompt, history),
        "stream": True,
        "max_tokens": tokens,
        "cache_prompt": True,
        **SAMPLING,
    }
    sent, first, timings = time.perf_counter(), None, {}
    for chunk in server.stream(body):
        delta = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
        if delta and first is None:
            first = time.perf_counter()
        timings = chunk.get("timings") or timings
    return {
        "ttft_ms": None if first is None else round((first - sent) * 1000, 1),
        "prompt_ms": timings.get("prompt_ms"),
        "cached_tokens": timings.get("cache_n"),
    }


def restarted_turn(module: Module, today: Module, histories, tokens: int) -> list[dict[str, Any]]:
    """Each user's next turn on a freshly started module, and the same request cold."""
    rows = []
    for user, history in enumerate(histories):
        prompt = RESTART_PROMPT
        rows.append({"user": user, "cached": module.chat(prompt, history, tokens), "cold": today.cold(prompt, history)})
        rows[-1]["cached"].pop("reply")
        rows[-1]["cold"].pop("reply")
    return rows


def single_user(modules: dict[str, Module], turns: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """One user alone (nobody in between), with and without the cache, taking turns per request."""
    runs = []
    for repeat in range(repeats):
        history: list[dict[str, str]] = []
        for turn in range(turns):
            prompt = f"(Run {repeat + 1}.) {first_prompt(0)}" if turn == 0 else CONVERSATION[turn]
            row = {"turn": turn + 1, "repeat": repeat}
            for key in ("cached", "today"):
                row[key] = modules[key].chat(prompt, history, tokens)
            history = history + [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": row["cached"].pop("reply")},
            ]
            row["today"].pop("reply")
            runs.append(row)
    return runs


def disk_bound(model: Path, threads: int, conversations: int, disk_mb: int, scratch: Path) -> dict[str, Any]:
    """Many one-turn conversations into a small disk tier (no RAM tier): the folder's size, checked as it goes."""
    folder = scratch / "disk-bound"
    env = {
        "CPAI_MODULE_LLAMA_THREADS": str(threads),
        "CPAI_MODULE_LLAMA_CACHE_RAM_MB": "0",
        "CPAI_MODULE_LLAMA_CACHE_DISK_GB": str(disk_mb / 1024),
        "CPAI_MODULE_LLAMA_CACHE_DIR": str(folder),
    }
    largest = 0
    with running_server(model, context_size=N_CTX, **env) as base_url:
        module = Module(base_url, 0.02)
        for i in range(conversations):
            module.chat(f"Tell me one fact about the number {i + 1}, please, and why it matters.", [], 2)
            if i % 25 == 24:
                largest = max(largest, folder_bytes(folder))
        stats = module.cache_stats(on_disk=conversations)
        module.close()
    largest = max(largest, folder_bytes(folder))
    return {
        "conversations": conversations,
        "limit_bytes": disk_mb << 20,
        "largest_folder_bytes": largest,
        "entries": stats["diskEntries"],
        "evicted": stats["evictedFromDisk"],
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def in_process(model: Path, threads: int, scratch: Path, tokens: int = 1000) -> dict[str, Any]:
    """KV bytes per token, and restoring a tokens-long conversation from RAM and from disk against evaluating it."""
    chat = LlamaChat.from_file(model, n_ctx=N_CTX, n_threads=threads)
    try:
        text = " ".join(f"Sentence {i} of a long conversation about ships, ports and the sea." for i in range(400))
        ids = chat.llm.tokenize(text.encode())[:tokens]
        started = time.perf_counter()
        chat.llm.eval(ids)
        eval_s = time.perf_counter() - started
        captured, state = chat.capture_state()
        valid_for = fingerprint(chat.model_path, chat.llm, N_CTX, 1)
        cache = ConversationCache(valid_for, len(state) * 2, len(state) * 4, scratch / "throughput")
        cache.save(captured, state)
        cache.flush()
        ram, disk = [], []
        for _ in range(3):
            started = time.perf_counter()
            hit = cache.find(captured + [1], 0)
            chat.restore_state(hit.tokens, hit.state)
            ram.append(time.perf_counter() - started)
            reopened = ConversationCache(valid_for, 0, len(state) * 4, scratch / "throughput")
            started = time.perf_counter()
            hit = reopened.find(captured + [1], 0)
            chat.restore_state(hit.tokens, hit.state)
            disk.append(time.perf_counter() - started)
            reopened.close()
        cache.close()
        mb = len(state) / 1e6
        return {
            "tokens": len(captured),
            "kv_bytes": len(state),
            "kv_bytes_per_token": round(len(state) / len(captured)),
            "evaluate_ms": round(eval_s * 1000, 1),
            "evaluate_tokens_per_second": round(len(captured) / eval_s, 1),
            "restore_ram_ms": summary(t * 1000 for t in ram),
            "restore_disk_ms": summary(t * 1000 for t in disk),
            "restore_ram_mb_per_s": round(mb / min(ram), 1),
            "restore_disk_mb_per_s": round(mb / min(disk), 1),
            "model_params": llama_cpp.llama_model_n_params(chat.llm.model),
        }
    finally:
        chat.close()


def start_module(stack: ExitStack, model: Path, threads: int, env: dict[str, str], poll_s: float) -> Module:
    base_url = stack.enter_context(
        running_server(model, context_size=N_CTX, CPAI_MODULE_LLAMA_THREADS=str(threads), **env)
    )
    module = Module(base_url, poll_s)
    stack.callback(module.close)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.conversations",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--users", type=int, nargs="+", default=USERS, help=f"at most {len(NAMES)}")
    parser.add_argument("--turns", type=int, default=10, help=f"at most {len(CONVERSATION)}")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every reply")
    parser.add_argument("--threads", type=int, default=default_max_threads(), help="CPU threads of every engine")
    parser.add_argument("--ram-mb", type=int, default=64, help="the cached module's RAM tier")
    parser.add_argument("--single-repeats", type=int, default=3)
    parser.add_argument("--disk-conversations", type=int, default=500)
    parser.add_argument("--disk-mb", type=int, default=48, help="the disk tier of the disk-bound part")
    parser.add_argument("--poll-ms", type=float, default=50, help="the clients' pause between polls")
    parser.add_argument("--kv-tokens", type=int, default=1000, help="the conversation restored in process")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, --parallel 4")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small` for SmolLM2-135M, or pass --model PATH")
    if args.kv_tokens < 64 or args.tokens < 2 or args.single_repeats < 1 or args.disk_conversations < 1:
        parser.error("--kv-tokens must be at least 64, --tokens 2, --single-repeats and --disk-conversations 1")
    if not all(1 <= n <= len(NAMES) for n in args.users) or not 2 <= args.turns <= len(CONVERSATION):
        parser.error(f"--users must be from 1 to {len(NAMES)}, --turns from 2 to {len(CONVERSATION)}")

    started = time.monotonic()
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "settings": {
            "users": sorted(args.users),
            "turns": args.turns,
            "tokens": args.tokens,
            "threads": args.threads,
            "n_ctx": N_CTX,
            "ram_mb": args.ram_mb,
            "disk_gb": 1,
            "poll_interval_s": args.poll_ms / 1000,
            "single_repeats": args.single_repeats,
            "disk_conversations": args.disk_conversations,
            "disk_mb": args.disk_mb,
            "kv_tokens": args.kv_tokens,
        },
        "load_start": machine.wait_until_idle(args.wait_idle, say),
        "phases": {},
    }
    poll_s = args.poll_ms / 1000
    with tempfile.TemporaryDirectory(prefix="llamachat-conversations-") as scratch, ExitStack() as stack:
        scratch = Path(scratch)
        cached_env = {
            "CPAI_MODULE_LLAMA_CACHE_RAM_MB": str(args.ram_mb),
            "CPAI_MODULE_LLAMA_CACHE_DISK_GB": "1",
            "CPAI_MODULE_LLAMA_CACHE_DIR": str(scratch / "conversation-cache"),
        }
        with machine.phase(results["phases"], "in process"):
            say("KV bytes per token and restore throughput, in process")
            results["in_process"] = in_process(args.model, args.threads, scratch, args.kv_tokens)
        say("starting the module with the cache and without it")
        first = ExitStack()
        modules = {
            "cached": start_module(first, args.model, args.threads, cached_env, poll_s),
            "today": start_module(stack, args.model, args.threads, NO_CONVERSATION_CACHE, poll_s),
        }
        server = None
        if args.llama_server:
            say(f"starting {args.llama_server} --parallel 4")
            server = LlamaServerEngine(args.llama_server, args.model, args.threads, scratch / "ls.log", parallel=4)
            stack.callback(server.close)
        for module in modules.values():  # one-time costs are not measured
            module.chat("Hello.", [], 2, "Warm up.")
        # Both modules' memory: today's grows too, as longer conversations touch more of its KV cache's pages.
        pids = {key: module.status()["pid"] for key, module in modules.items()}
        rss = {key: {"after_load_mb": round(rss_mb(pid), 1)} for key, pid in pids.items()}
        with machine.phase(results["phases"], "single user"):
            say(f"one user, {args.turns} turns, with and without the cache, {args.single_repeats} repeats")
            results["single_user"] = single_user(modules, args.turns, args.tokens, args.single_repeats)
        results["alternation"] = {}
        last = None
        with machine.phase(results["phases"], "users taking turns"):
            for users in sorted(args.users):
                say(f"{users} users taking turns, {args.turns} turns each")
                part = alternate(modules, users, args.turns, args.tokens, server if users <= 4 else None)
                last = part.pop("histories")
                part["cache"] = modules["cached"].cache_stats()
                results["alternation"][str(users)] = part
                for key, pid in pids.items():
                    rss[key][f"after_{users}_users_mb"] = round(rss_mb(pid), 1)
        rss["ram_bound_mb"] = args.ram_mb
        results["rss"] = rss
        first.close()  # the cached module stops: its queued disk writes are done
        with machine.phase(results["phases"], "restart"):
            say("the cached module restarted: each user's next turn")
            again = start_module(stack, args.model, args.threads, cached_env, poll_s)
            results["restart"] = restarted_turn(again, modules["today"], last, args.tokens)
        with machine.phase(results["phases"], "disk bound"):
            say(f"{args.disk_conversations} conversations into a {args.disk_mb} MB disk tier")
            results["disk_bound"] = disk_bound(args.model, args.threads, args.disk_conversations, args.disk_mb, scratch)
    conclude(results, started, "goal", conversations_report.evaluate_goals, conversations_report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
