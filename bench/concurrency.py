"""python -m bench.concurrency: several clients chatting at once, on one GGUF with the same threads: the queue
(the module's single-chat path, one chat after another in arrival order), the batched engine (batch_decoder.py,
the chats decoded together in one context), and optionally llama.cpp's llama-server with --parallel slots, the
anchor. For 1, 2 and 4 clients arriving together: aggregate tokens/s (all replies' tokens over the time from the
arrival to the last token), each chat's tokens/s and its time to first token from the arrival (a queued chat's wait
included). Engines take turns within each repeat; writes concurrency.json, concurrency.md and concurrency.png.

Each in-process engine computes on a thread that ends with its turn: llama.cpp's OpenMP keeps a team of worker
threads for every thread that has computed, and one idle team beside the working one slowed the working one from
~145 to ~100 tokens/s on two cores (libgomp spins less once more threads exist than cores). The module keeps to one
computing thread for the same reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from llama_chat import LlamaChat
from llamachat.batch_decoder import BatchChat, BatchDecoder
from llamachat.chat_job import ChatJob
from llamachat.thread_policy import default_max_threads
from tests.live_server import ROOT

from . import concurrency_report, machine
from .console import say
from .cpai_client import ChatFailed, CpaiClient
from .llama_server import LlamaServerEngine
from .module_bench import chat_fields
from .report import conclude
from .threads import start_servers
from .workload import DEFAULT_MODEL, N_CTX, SAMPLING, SYSTEM_PROMPT

# One prompt per client, each asking for a long text, so that no reply ends long before max_tokens.
PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Write a long essay about the history of trains in Europe.",
    "Describe, at length, a day in the life of a lighthouse keeper.",
    "Write a long letter from a gardener to her apprentice about growing tomatoes.",
]
CLIENTS = [1, 2, 4]


def _client(job: ChatJob) -> dict[str, Any]:
    """One client's figures, as the module reports them (ChatJob), timed from the moment every client arrived."""
    metrics = job.metrics()
    return {
        "ttft_ms": metrics["time_to_first_token_ms"],
        "tokens_per_second": metrics["tokens_per_second"] or None,
        "tokens": job.completion_tokens,
        "end_s": (job.last_token_at or job.started) - job.started,
        "text": job.reply,
    }


def _jobs(count: int, started: float) -> list[ChatJob]:
    jobs = [ChatJob(f"client-{i}", "") for i in range(count)]
    for job in jobs:
        job.started = started
    return jobs


class Sequential:
    """The queue: LlamaChat.do_chat as the module streams it, the chats one after another in arrival order."""

    def __init__(self, chat: LlamaChat) -> None:
        self.chat = chat

    def run(self, prompts: list[str], system_prompt: str, max_tokens: int) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(1) as own_thread:  # see the module's docstring
            return own_thread.submit(self._run, prompts, system_prompt, max_tokens).result()

    def _run(self, prompts: list[str], system_prompt: str, max_tokens: int) -> list[dict[str, Any]]:
        jobs = _jobs(len(prompts), time.perf_counter())
        for prompt, job in zip(prompts, jobs):
            stream = self.chat.do_chat(prompt, system_prompt, stream=True, max_tokens=max_tokens, **SAMPLING)
            for chunk in stream:
                job.add_text(chunk["choices"][0]["delta"].get("content") or "", self.chat.generated_tokens)
        return [_client(job) for job in jobs]


class Batched:
    """batch_decoder.BatchDecoder: every client's chat submitted at once, decoded in one shared batch."""

    def __init__(self, chat: LlamaChat, n_seq: int) -> None:
        self.chat, self.n_seq = chat, n_seq

    def run(self, prompts: list[str], system_prompt: str, max_tokens: int) -> list[dict[str, Any]]:
        chat = self.chat
        sampling = {**SAMPLING, "stop": chat.template.stops}
        requests = [chat.tokenize_messages(chat.messages(prompt, system_prompt)) for prompt in prompts]
        # A decoder per turn, made before the clock starts: its worker thread ends with the turn (module docstring).
        decoder = BatchDecoder(chat.llm, self.n_seq, n_ctx=N_CTX)
        try:
            jobs = _jobs(len(prompts), time.perf_counter())
            chats = [
                decoder.submit(BatchChat(tokens, max_tokens, sampling, on_text=job.add_text))
                for tokens, job in zip(requests, jobs)
            ]
            for batch_chat in chats:
                batch_chat.wait()
                if batch_chat.error:
                    raise RuntimeError(f"the batched engine failed: {batch_chat.error}")
        finally:
            decoder.close()
        return [_client(job) for job in jobs]


class Server:
    """llama-server with --parallel slots, each client its own HTTP stream."""

    def __init__(self, engine: LlamaServerEngine) -> None:
        self.engine = engine

    def run(self, prompts: list[str], system_prompt: str, max_tokens: int) -> list[dict[str, Any]]:
        jobs = _jobs(len(prompts), time.perf_counter())

        def client(prompt: str, job: ChatJob) -> None:
            body = {
                "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}],
                "stream": True,
                "max_tokens": max_tokens,
                "cache_prompt": False,
                **SAMPLING,
            }
            chunks = 0
            for chunk in self.engine.stream(body):
                text = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if text:  # one chunk a token, as bench.llama_server counts them
                    chunks += 1
                    job.add_text(text, chunks)

        with ThreadPoolExecutor(len(prompts)) as pool:
            for future in [pool.submit(client, prompt, job) for prompt, job in zip(prompts, jobs)]:
                future.result()
        return [_client(job) for job in jobs]


class Module:
    """The module behind our server, started with CPAI_MODULE_LLAMA_PARALLEL as given; each client posts its chat
    and polls it every poll_s, as the Explorer page does. TTFT is when a client first sees text; tokens/s is the
    module's own figure; a chat ends for the aggregate when its client sees it completed."""

    def __init__(self, base_url: str, poll_s: float) -> None:
        self.base_url, self.poll_s = base_url, poll_s

    def run(self, prompts: list[str], system_prompt: str, max_tokens: int) -> list[dict[str, Any]]:
        started = time.perf_counter()

        def client(prompt: str) -> dict[str, Any]:
            cpai = CpaiClient(self.base_url)
            try:
                trace = cpai.follow(cpai.start_chat(chat_fields(prompt, [], max_tokens, system_prompt)), self.poll_s)
            finally:
                cpai.close()
            final = trace.final
            if not final.get("success"):
                raise ChatFailed(f"the chat failed: {final.get('error') or final}")
            seen = next((p.at for p in trace.polls if p.reply_chars), None)
            return {
                "ttft_ms": None if seen is None else (seen - started) * 1000,
                "tokens_per_second": final["tokens_per_second"] or None,
                "tokens": final["completion_tokens"],
                "end_s": trace.polls[-1].at - started,
                "text": final["reply"],
            }

        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(client, prompts))


def measure(engines: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    for engine in engines.values():  # one-time costs (buffers, template compilation) are not measured
        engine.run(PROMPTS[:1], SYSTEM_PROMPT, 8)
    runs: dict[str, dict[str, list]] = {key: {str(n): [] for n in args.clients} for key in engines}
    # Greedy decoding: the batched engine must give every chat the reply it gets alone (the queue's).
    same_replies = {"batched": 0, "of": 0}
    results: dict[str, Any] = {"phases": {}}
    with machine.phase(results["phases"], "measuring"):
        for repeat in range(args.repeats):
            for clients in args.clients:
                # Its own system prompt per repeat and client count (the same for every engine), different from its
                # first words on: nothing of it is in a cache, so every engine evaluates every prompt in full.
                system_prompt = f"(Run {repeat + 1}, {clients} clients.) {SYSTEM_PROMPT}"
                say(f"repeat {repeat + 1}/{args.repeats}: {clients} client(s), {', '.join(engines)}")
                texts = {}
                for key, engine in engines.items():
                    time.sleep(args.pause)
                    chats = engine.run(PROMPTS[:clients], system_prompt, args.tokens)
                    texts[key] = [chat.pop("text") for chat in chats]
                    runs[key][str(clients)].append(chats)
                same_replies["batched"] += sum(a == b for a, b in zip(texts["batched"], texts["sequential"]))
                if "module_parallel" in texts:
                    same = sum(a == b for a, b in zip(texts["module_parallel"], texts["module_queue"]))
                    same_replies["module_parallel"] = same_replies.get("module_parallel", 0) + same
                same_replies["of"] += clients
    results["same_replies"] = same_replies
    results["runs"] = runs
    results["summary"] = {
        key: {n: concurrency_report.summarise(by_clients[n]) for n in by_clients} for key, by_clients in runs.items()
    }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every reply")
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS, help=f"at most {len(PROMPTS)}")
    parser.add_argument("--threads", type=int, default=default_max_threads(), help="CPU threads of every engine")
    parser.add_argument("--pause", type=float, default=0.5, metavar="SECONDS", help="before each engine's turn")
    parser.add_argument(
        "--module",
        action="store_true",
        help="also the module through our server: CPAI_MODULE_LLAMA_PARALLEL=1 (the queue) and = the most clients",
    )
    parser.add_argument("--poll-ms", type=float, default=50, help="the module's clients' pause between polls")
    parser.add_argument(
        "--llama-server", type=Path, help="llama.cpp's llama-server binary, the anchor (its row is left out without)"
    )
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small` for SmolLM2-135M, or pass --model PATH")
    if args.llama_server is not None and not args.llama_server.is_file():
        parser.error(f"--llama-server {args.llama_server}: no such file")
    if args.repeats < 1 or args.tokens < 2 or args.threads < 1 or args.pause < 0 or args.poll_ms <= 0:
        parser.error(
            "--repeats and --threads must be at least 1, --tokens at least 2, --pause at least 0, --poll-ms above 0"
        )
    if not all(1 <= n <= len(PROMPTS) for n in args.clients):
        parser.error(f"--clients must be from 1 to {len(PROMPTS)}")
    args.clients = sorted(set(args.clients))
    n_seq = max(args.clients)

    started = time.monotonic()
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "settings": {
            "repeats": args.repeats,
            "tokens": args.tokens,
            "clients": args.clients,
            "threads": args.threads,
            "n_ctx_per_chat": N_CTX,
            "sequences": n_seq,
            "pause_s": args.pause,
            "poll_interval_s": args.poll_ms / 1000 if args.module else None,
        },
        "load_start": machine.wait_until_idle(args.wait_idle, say),
    }
    say(f"model {args.model}, {args.threads} threads; results go to {args.out}")
    with ExitStack() as stack:
        chat = LlamaChat.from_file(args.model, n_ctx=N_CTX, n_threads=args.threads)
        stack.callback(chat.close)
        engines: dict[str, Any] = {"sequential": Sequential(chat)}
        engines["batched"] = Batched(chat, n_seq)
        if args.module:
            say(f"starting python -m llamachat_server with CPAI_MODULE_LLAMA_PARALLEL 1 and {n_seq}")
            modules = {
                key: {"CPAI_MODULE_LLAMA_THREADS": str(args.threads), "CPAI_MODULE_LLAMA_PARALLEL": str(parallel)}
                for key, parallel in (("module_queue", 1), ("module_parallel", n_seq))
            }
            for key, base_url in start_servers(stack, args.model, modules).items():
                engines[key] = Module(base_url, args.poll_ms / 1000)
        if args.llama_server:
            say(f"starting {args.llama_server} with --parallel {n_seq}")
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "llama-server.log"
            server = LlamaServerEngine(args.llama_server, args.model, args.threads, log, parallel=n_seq)
            stack.callback(server.close)
            engines["llama_server"] = Server(server)
        else:
            say("no --llama-server given: its row is left out")
        results.update(measure(engines, args))
    conclude(results, started, "goal", concurrency_report.evaluate_goals, concurrency_report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
