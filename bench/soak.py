"""python -m bench.soak: many chats through the standalone server (tests/live_server.py's running_server, the real
module on a real GGUF), with random cancels and random bad inputs mixed in. Checks that every chat ends in a
terminal state, every bad input gets a clear `success: false`, the module never restarts, and neither the server's
nor the module's resident memory grows by more than 5 % from the end of the warm-up to the end of the run.
Writes soak.json and soak.md into --out.

RSS is read with psutil (the server: the module's parent process) after the warm-up chats, every 20 chats, and at
the end; each reading is taken with no chat running (after the previous chat's terminal answer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import psutil
import requests

from tests.live_server import ROOT, rss_mb, running_server, server_status
from tests.model_paths import smollm2_path

from . import machine
from .workload import NO_CONVERSATION_CACHE

CHAT = "/v1/text/chat"
STATUS = "/v1/LlamaChat/get_command_status"
CANCEL = "/v1/LlamaChat/cancel_command"
GROWTH_LIMIT_PCT = 5.0
PROMPTS = [
    "Say hello.",
    "Name three colours.",
    "What is 2 + 2?",
    "Write a haiku about rain.",
    "Give me a tip for sleeping well.",
    "Describe a cat in one sentence.",
]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DEEP = "[" * 50_000 + "]" * 50_000

# (name, request keyword arguments for requests.post, text the error must contain)
BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("max_tokens-text", {"url": CHAT, "data": {"prompt": "Hi", "max_tokens": "lots"}}, "max_tokens"),
    ("temperature-nan", {"url": CHAT, "data": {"prompt": "Hi", "temperature": "nan"}}, "temperature"),
    ("messages-deep", {"url": CHAT, "data": {"prompt": "Hi", "messages": DEEP}}, "nested more than"),
    (
        "messages-bad-role",
        {"url": CHAT, "data": {"prompt": "Hi", "messages": '[{"role": "system", "content": "x"}]'}},
        "role",
    ),
    ("non-utf8-form", {"url": CHAT, "data": b"prompt=\xff\xfe", "headers": FORM}, "not valid UTF-8"),
    ("json-deep", {"url": CHAT, "data": DEEP, "headers": {"Content-Type": "application/json"}}, "nested too deeply"),
    ("content-type", {"url": CHAT, "data": b"\x00", "headers": {"Content-Type": "image/png"}}, "Unsupported"),
    ("unknown-route", {"url": "/v1/text/chatty", "data": {"prompt": "Hi"}}, "No module answers"),
    ("status-unknown-id", {"url": STATUS, "data": {"commandId": "no-such-id"}}, "command"),
    ("cancel-unknown-id", {"url": CANCEL, "data": {"commandId": "no-such-id"}}, "command"),
]


class Soak:
    def __init__(
        self,
        base_url: str,
        rng: random.Random,
        max_tokens: int,
        cancel_rate: float,
        bad_rate: float,
        poll_s: float,
        chat_timeout: float,
    ) -> None:
        self.base_url = base_url
        self.rng = rng
        self.max_tokens = max_tokens
        self.cancel_rate = cancel_rate
        self.bad_rate = bad_rate
        self.poll_s = poll_s
        self.chat_timeout = chat_timeout
        self.session = requests.Session()
        self.endings: Counter = Counter()
        self.bad_inputs: Counter = Counter()
        self.failures: list[str] = []
        self.chat_seconds: list[float] = []

    def post(self, url: str, **kwargs) -> dict[str, Any]:
        response = self.session.post(f"{self.base_url}{url}", timeout=60, **kwargs)
        return response.json()

    def bad_input(self) -> None:
        name, request, expected = self.rng.choice(BAD_INPUTS)
        answer = self.post(**request)
        self.bad_inputs[name] += 1
        if answer.get("success") is not False or expected not in str(answer.get("error")):
            self.failures.append(f"bad input {name}: {answer}")

    def chat(self) -> None:
        started = time.monotonic()
        ack = self.post(
            CHAT,
            data={
                "prompt": self.rng.choice(PROMPTS),
                "max_tokens": str(self.max_tokens),
                "temperature": f"{self.rng.uniform(0, 1):.2f}",
            },
        )
        if not ack.get("success"):
            self.failures.append(f"chat refused: {ack}")
            return
        command_id = ack["commandId"]
        cancel_after = self.rng.randint(0, 3) if self.rng.random() < self.cancel_rate else None
        polls = 0
        while time.monotonic() - started < self.chat_timeout:
            if cancel_after is not None and polls == cancel_after:
                self.post(CANCEL, data={"commandId": command_id})
            answer = self.post(STATUS, data={"commandId": command_id})
            polls += 1
            if answer.get("commandStatus") == "completed":
                self.endings[
                    f"{'cancel sent, ' if cancel_after is not None else ''}"
                    f"{answer.get('stop_reason') or 'no stop_reason'}"
                ] += 1
                if not answer.get("success") and answer.get("stop_reason") != "cancelled":
                    self.failures.append(f"chat failed: {answer.get('error')}")
                self.chat_seconds.append(time.monotonic() - started)
                return
            if answer.get("commandStatus") not in ("queued", "running"):  # queued: behind a cancelled chat still ending
                self.failures.append(f"chat {command_id} in state {answer.get('commandStatus')}: {answer}")
                return
            time.sleep(self.poll_s)  # a client's poll interval
        self.failures.append(f"chat {command_id} did not end within {self.chat_timeout:g} s")


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    rng = random.Random(args.seed)
    load = machine.load_average()
    with running_server(args.model, CPAI_MODULE_LLAMA_THREADS=str(args.threads), **NO_CONVERSATION_CACHE) as base_url:
        status = server_status(base_url)
        module_pid = status["pid"]
        server_pid = psutil.Process(module_pid).parent().pid
        soak = Soak(
            base_url, rng, args.max_tokens, args.cancel_rate, args.bad_rate, args.poll_ms / 1000, args.chat_timeout
        )
        rss_at_start = {"server_mb": round(rss_mb(server_pid), 1), "module_mb": round(rss_mb(module_pid), 1)}
        curve = []
        started = time.monotonic()
        for i in range(args.chats):
            if rng.random() < args.bad_rate:
                soak.bad_input()
            soak.chat()
            done = i + 1
            if done == args.warmup or (done > args.warmup and (done % 20 == 0 or done == args.chats)):
                curve.append(
                    {
                        "chats": done,
                        "server_mb": round(rss_mb(server_pid), 1),
                        "module_mb": round(rss_mb(module_pid), 1),
                    }
                )
                say(f"{done} chats: server {curve[-1]['server_mb']} MB, module {curve[-1]['module_mb']} MB")
        elapsed = time.monotonic() - started
        final_status = server_status(base_url)
        log_entries = len(requests.get(f"{base_url}/v1/log/list", params={"count": 1000}, timeout=10).json()["entries"])

    base, last = curve[0], curve[-1]
    growth = {
        who: round(100 * (last[f"{who}_mb"] - base[f"{who}_mb"]) / base[f"{who}_mb"], 2) for who in ("server", "module")
    }
    chats_ended = sum(soak.endings.values())
    checks = {
        "every_chat_ended": chats_ended == args.chats,
        "no_failures": not soak.failures,
        "module_never_restarted": final_status["restarts"] == 0 and final_status["pid"] == module_pid,
        "queue_empty_at_end": final_status["queued"] == 0,
        f"server_rss_growth_below_{GROWTH_LIMIT_PCT:g}_pct": growth["server"] < GROWTH_LIMIT_PCT,
        f"module_rss_growth_below_{GROWTH_LIMIT_PCT:g}_pct": growth["module"] < GROWTH_LIMIT_PCT,
    }
    times = sorted(soak.chat_seconds)
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": machine.commit(),
        "machine": machine.describe(),
        "load_1min_at_start": load,
        # A path is recorded by its file name: results carry no local paths.
        "settings": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "chats": args.chats,
        "chats_ended": chats_ended,
        "endings": dict(soak.endings),
        "bad_inputs": dict(soak.bad_inputs),
        "bad_inputs_sent": sum(soak.bad_inputs.values()),
        "failures": soak.failures[:20],
        "failure_count": len(soak.failures),
        "elapsed_s": round(elapsed, 1),
        "chat_seconds": {"median": round(times[len(times) // 2], 3), "max": round(times[-1], 3)} if times else None,
        "rss_at_start": rss_at_start,
        "rss_curve": curve,
        "rss_growth_pct": growth,
        "module_restarts": final_status["restarts"],
        "log_entries_listed": log_entries,
        "checks": checks,
        "passed": all(checks.values()),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Soak: chats through the standalone server with random cancels and bad inputs",
        "",
        f"{result['when']}, {result['machine']['cpu']} ({result['machine']['logical_cpus']} logical CPUs), "
        f"1-minute load {result['load_1min_at_start']} at start. Model `{Path(s['model']).name}`, "
        f"{s['threads']} thread(s), max_tokens {s['max_tokens']}, cancel rate {s['cancel_rate']}, bad-input rate "
        f"{s['bad_rate']}, seed {s['seed']}. Command: `.venv/bin/python -m bench.soak`.",
        "",
        f"**{'PASSED' if result['passed'] else 'FAILED'}**: {result['chats_ended']} of {result['chats']} chats ended "
        f"in a terminal state in {result['elapsed_s']} s; {result['bad_inputs_sent']} bad inputs, each answered "
        f"`success: false` with a clear error; {result['failure_count']} failures; module restarts: "
        f"{result['module_restarts']}.",
        "",
        "| check | result |",
        "|---|---|",
        *[f"| {name.replace('_', ' ')} | {'yes' if ok else 'NO'} |" for name, ok in result["checks"].items()],
        "",
        "## Memory (RSS, MB)",
        "",
        f"Growth is measured from the end of the {s['warmup']}-chat warm-up (first row) to the end (last row), each "
        f"reading taken between chats. At start (before any chat): server {result['rss_at_start']['server_mb']}, "
        f"module {result['rss_at_start']['module_mb']}.",
        "",
        "| chats | server | module |",
        "|---|---|---|",
        *[f"| {row['chats']} | {row['server_mb']} | {row['module_mb']} |" for row in result["rss_curve"]],
        "",
        f"Growth after warm-up: server {result['rss_growth_pct']['server']:+.2f} %, module "
        f"{result['rss_growth_pct']['module']:+.2f} % (limit {GROWTH_LIMIT_PCT:g} %).",
        "",
        "## How the chats ended",
        "",
        "| ending | chats |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in sorted(result["endings"].items())],
        "",
        "## Bad inputs mixed in",
        "",
        "| input | sent |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in sorted(result["bad_inputs"].items())],
        "",
    ]
    if result["failures"]:
        lines += ["## Failures (first 20)", "", *[f"- {failure}" for failure in result["failures"]], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=smollm2_path(), help="GGUF to chat with (default: SmolLM2)")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="chats before the first RSS reading")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cancel-rate", type=float, default=0.25, help="share of chats cancelled mid-reply")
    parser.add_argument("--bad-rate", type=float, default=0.3, help="share of chats preceded by a bad input")
    parser.add_argument("--poll-ms", type=int, default=50)
    parser.add_argument("--chat-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.warmup >= args.chats:
        parser.error("--warmup must be smaller than --chats")
    if not args.model.is_file():
        parser.error(f"no model at {args.model}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
