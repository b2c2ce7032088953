"""python -m bench.threads: generation speed and time to first token when the CPU is shared, for llama.cpp's thread
choices: raw llama-cpp-python with a fixed count (all cores, one), and the module through our standalone server,
polled as a client would, with all cores pinned (the old default), one thread pinned, all cores with
OMP_WAIT_POLICY=PASSIVE, and the adaptive mode (the default), the last polled both at --poll-ms and at the
Explorer page's slower pace (--page-poll-ms). Under three loads: idle, one core kept busy by a
`while True: pass`, and a second llama.cpp process generating without pause (another AI module). Each load runs in
a session of its own, as another service's processes do (see thread_policy.py for why that matters). Engines take
turns within each repeat; writes threads.json, threads.md and threads.png into --out.
"""

import argparse
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import llama_cpp
from llama_cpp import Llama

from llama_chat import plain_llama
from llamachat.thread_policy import default_max_threads
from tests.live_server import ROOT, running_server

from . import machine, report, threads_report
from .console import say
from .cpai_client import ChatFailed, CpaiClient
from .measure import summarise
from .module_bench import chat_fields
from .neighbour import READY
from .stream_timing import time_stream
from .workload import (
    DEFAULT_MODEL,
    GENERATION_PROMPT,
    N_CTX,
    NO_CONVERSATION_CACHE,
    SAMPLING,
    SYSTEM_PROMPT,
    chat_messages,
)

LOADS = ["idle", "busy_core", "neighbour"]
SETTLE_S = 1.5  # after a load starts: the scheduler and the module's load monitor (0.5 s windows) see it


def _until(deadline: float, stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The stream, cut off at the deadline: a collapsed engine (~1 token/s) is measured without waiting minutes."""
    try:
        for chunk in stream:
            yield chunk
            if time.perf_counter() > deadline:
                return
    finally:
        stream.close()


class RawFixed:
    """Raw llama-cpp-python on one shared model, computing with a fixed thread count."""

    def __init__(self, llm: Llama, threads: int) -> None:
        self.llm, self.threads = llm, threads

    def chat(self, system_prompt: str, max_tokens: int, time_box_s: float) -> dict[str, Any]:
        llama_cpp.llama_set_n_threads(self.llm.ctx, self.threads, self.threads)
        self.llm.reset()
        messages = [{"role": "system", "content": system_prompt}, *chat_messages(GENERATION_PROMPT)[1:]]
        deadline = time.perf_counter() + time_box_s
        run = time_stream(
            lambda: _until(
                deadline,
                self.llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, **SAMPLING),
            )
        )
        return {
            "ttft_ms": run.ttft_ms,
            "tokens_per_second": run.tokens_per_second,
            "tokens": run.tokens,
            "threads": self.threads,
        }


class ModuleClient:
    """The module behind our server, polled every poll_s; a chat still running after time_box_s is cancelled
    (the tokens so far count)."""

    def __init__(self, base_url: str, poll_s: float) -> None:
        self.client = CpaiClient(base_url)
        self.poll_s = poll_s

    def chat(self, system_prompt: str, max_tokens: int, time_box_s: float) -> dict[str, Any]:
        trace = self.client.start_chat(chat_fields(GENERATION_PROMPT, [], max_tokens, system_prompt))
        deadline, cancelled = trace.sent_at + time_box_s, False
        while self.client.poll(trace).running:
            if not cancelled and time.perf_counter() > deadline:
                self.client.cancel(trace)
                cancelled = True
            time.sleep(self.poll_s)
        final = trace.final
        if not final.get("success"):
            raise ChatFailed(f"the chat failed: {final.get('error') or final}")
        seen = Counter(p.threads for p in trace.polls if p.running and p.threads is not None)
        return {
            "ttft_ms": trace.client_ttft_ms(),
            "tokens_per_second": trace.client_tokens_per_second(),
            "tokens": final["completion_tokens"],
            "module_ttft_ms": final["time_to_first_token_ms"],
            "module_tokens_per_second": final["tokens_per_second"],
            "threads": final.get("threads"),
            "threads_seen": dict(sorted(seen.items(), reverse=True)),  # thread count -> polls that saw it running
        }

    def close(self) -> None:
        self.client.close()


@contextmanager
def load(kind: str, model: Path, cores: int) -> Iterator[None]:
    """The other work on the machine while measuring, in a session of its own."""
    command = {
        "idle": None,
        "busy_core": [sys.executable, "-c", "while True: pass"],
        "neighbour": [sys.executable, "-m", "bench.neighbour", str(model), str(cores)],
    }[kind]
    if command is None:
        yield
        return
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        if kind == "neighbour" and process.stdout.readline().strip() != READY:
            raise RuntimeError(f"the neighbour llama.cpp process did not start (exit code {process.wait()})")
        time.sleep(SETTLE_S)
        yield
    finally:
        process.kill()
        process.wait()


def start_servers(stack: ExitStack, model: Path, modules: dict[str, dict[str, str]]) -> dict[str, str]:
    """One server per module environment, started side by side; each stopped when the stack closes."""
    servers = {
        key: running_server(model, context_size=N_CTX, **NO_CONVERSATION_CACHE, **env) for key, env in modules.items()
    }
    with ThreadPoolExecutor(len(servers)) as pool:
        starting = {key: pool.submit(server.__enter__) for key, server in servers.items()}
    urls, failure = {}, None
    for key, future in starting.items():
        try:
            urls[key] = future.result()
            stack.push(servers[key])  # its __exit__ stops it
        except Exception as ex:
            failure = failure or ex
    if failure is not None:
        raise failure
    return urls


def measure(engines: dict[str, Any], args: argparse.Namespace, loads: list[str]) -> dict[str, Any]:
    for engine in engines.values():  # one-time costs (buffers, template compilation) are not measured
        engine.chat(SYSTEM_PROMPT, 8, args.time_box)
    results: dict[str, Any] = {"phases": {}}
    for kind in loads:
        say(f"load {kind}: {args.repeats} repeats of {', '.join(engines)}")
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in engines}
        with machine.phase(results["phases"], kind), load(kind, args.model, default_max_threads()):
            for repeat in range(args.repeats):
                # Its own system prompt per load and repeat (the same for every engine): nothing of it is cached.
                system_prompt = f"{SYSTEM_PROMPT} ({kind}, run {repeat + 1})"
                for key, engine in engines.items():
                    time.sleep(args.pause)
                    runs[key].append(engine.chat(system_prompt, args.tokens, args.time_box))
        results[kind] = {key: {"summary": summarise(r), "runs": r} for key, r in runs.items()}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.threads", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument(
        "--time-box",
        type=float,
        default=6.0,
        metavar="SECONDS",
        help="a reply still running after this long is cut off (collapsed engines)",
    )
    parser.add_argument("--poll-ms", type=float, default=100, help="the client's pause between status polls")
    parser.add_argument(
        "--page-poll-ms",
        type=float,
        default=250,
        help="the pause of a second client of the adaptive module, at the Explorer page's pace",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="before each reply, so that the module's load monitor sees the load under test rather "
        "than the engine that took its turn just before (a person's next message comes seconds "
        "after the last reply, not at once)",
    )
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=LOADS)
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small` for SmolLM2-135M, or pass --model PATH")
    polls = min(args.poll_ms, args.page_poll_ms)
    if args.repeats < 1 or args.tokens < 2 or args.time_box <= 0 or polls <= 0 or args.pause < 0:
        parser.error(
            "--repeats must be at least 1, --tokens at least 2, --time-box, --poll-ms and --page-poll-ms more "
            "than 0, --pause at least 0"
        )

    cores = default_max_threads()
    started = time.monotonic()
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "settings": {
            "repeats": args.repeats,
            "tokens": args.tokens,
            "time_box_s": args.time_box,
            "poll_interval_s": args.poll_ms / 1000,
            "page_poll_interval_s": args.page_poll_ms / 1000,
            "pause_s": args.pause,
            "all_cores": cores,
            "n_ctx": N_CTX,
        },
        "load_start": machine.wait_until_idle(args.wait_idle, say),
    }
    say(f"model {args.model}, {cores} cores; results go to {args.out}")
    modules: dict[str, dict[str, str]] = {
        "module_all": {"CPAI_MODULE_LLAMA_THREADS": str(cores)},
        "module_one": {"CPAI_MODULE_LLAMA_THREADS": "1"},
        "module_all_passive": {"CPAI_MODULE_LLAMA_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"},
        "module_adaptive": {"CPAI_MODULE_LLAMA_THREADS": "0"},
    }
    with ExitStack() as stack:
        llm = plain_llama(args.model, N_CTX, cores)
        stack.callback(llm.close)
        engines: dict[str, Callable] = {"raw_all": RawFixed(llm, cores), "raw_one": RawFixed(llm, 1)}
        say(f"starting python -m llamachat_server for {', '.join(modules)}")
        urls = start_servers(stack, args.model, modules)
        clients = {key: (url, args.poll_ms) for key, url in urls.items()}
        clients["module_adaptive_page"] = (urls["module_adaptive"], args.page_poll_ms)
        for key, (base_url, poll_ms) in clients.items():
            engines[key] = ModuleClient(base_url, poll_ms / 1000)
            stack.callback(engines[key].close)
        results.update(measure(engines, args, args.loads))
    report.conclude(results, started, "goal", threads_report.evaluate_goals, threads_report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
