"""Structured output's speed: the server's OpenAI API with response_format json_schema against llama.cpp's own
llama-server given the same schema, and the same chats unconstrained (module against raw llama-cpp-python), so that
the grammar's cost is seen apart from the engine's.

Goals (issue 26): tokens/s under a JSON schema >= 0.9 x llama-server with the same schema, same model and threads;
unconstrained tokens/s unchanged (the module against raw llama-cpp-python, as bench's other figures).

Each engine reports its own generation speed (the module its status' tokens_per_second, llama-server its
timings.predicted_per_second, raw llama-cpp-python the tokens after the first over their time), so that the server's
relay does not count. Engines take turns within every repeat; every schema'd reply is validated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import requests

from llamachat.thread_policy import default_max_threads
from llamachat_server.openai_api import COMMAND_ID_HEADER
from tests.live_server import ROOT, running_server

from . import machine, structured_report
from .console import say
from .in_process import RawEngine
from .llama_server import LlamaServerEngine
from .report import conclude
from .stats import summary
from .workload import DEFAULT_MODEL, N_CTX, NO_CONVERSATION_CACHE, SAMPLING, chat_messages

TEXT = {"type": "string", "maxLength": 40}
# Long replies (a few hundred tokens), so that steady generation is measured rather than its start and end.
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "books": (
        "List ten classic novels with their authors, years and genres, as JSON.",
        {
            "type": "array",
            "minItems": 10,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "title": TEXT,
                    "author": TEXT,
                    "year": {"type": "integer", "minimum": 1700, "maximum": 2025},
                    "genre": {"enum": ["novel", "poetry", "drama", "science fiction", "mystery"]},
                },
                "required": ["title", "author", "year", "genre"],
            },
        },
    ),
    "itinerary": (
        "Plan a week in Kyoto, day by day, as JSON.",
        {
            "type": "object",
            "properties": {
                "city": TEXT,
                "days": {
                    "type": "array",
                    "minItems": 7,
                    "maxItems": 7,
                    "items": {
                        "type": "object",
                        "properties": {
                            "day": {"type": "integer", "minimum": 1, "maximum": 7},
                            "morning": TEXT,
                            "afternoon": TEXT,
                            "evening": TEXT,
                        },
                        "required": ["day", "morning", "afternoon", "evening"],
                    },
                },
            },
            "required": ["city", "days"],
        },
    ),
    "inventory": (
        "Make up a shop's stock list of twelve items with prices, as JSON.",
        {
            "type": "array",
            "minItems": 12,
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {
                    "item": TEXT,
                    "quantity": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    "in_stock": {"type": "boolean"},
                },
                "required": ["item", "quantity", "price", "in_stock"],
            },
        },
    ),
}


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


class ModuleEngine:
    """The server's POST /v1/chat/completions; the module's own figures come from get_command_status."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.session.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=600)
        answer.raise_for_status()
        status = self.session.post(
            f"{self.base_url}/v1/LlamaChat/get_command_status",
            data={"commandId": answer.headers[COMMAND_ID_HEADER]},
            timeout=30,
        ).json()
        return {
            "text": answer.json()["choices"][0]["message"]["content"],
            "tokens": answer.json()["usage"]["completion_tokens"],
            "tokens_per_second": status["tokens_per_second"],
        }

    def close(self) -> None:
        self.session.close()


def llama_server_chat(server: LlamaServerEngine, body: dict[str, Any]) -> dict[str, Any]:
    answer = requests.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body, timeout=600)
    answer.raise_for_status()
    reply = answer.json()
    return {
        "text": reply["choices"][0]["message"]["content"],
        "tokens": reply["usage"]["completion_tokens"],
        "tokens_per_second": reply["timings"]["predicted_per_second"],
    }


def raw_chat(raw: RawEngine, prompt: str, max_tokens: int) -> dict[str, Any]:
    run = raw.chat(prompt, [], max_tokens, fresh=True)
    return {"text": run["text"], "tokens": run["tokens"], "tokens_per_second": run["tokens_per_second"]}


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in SCHEMAS}
    with ExitStack() as stack:
        base_url = stack.enter_context(
            running_server(
                args.model, context_size=N_CTX, CPAI_MODULE_LLAMA_THREADS=str(args.threads), **NO_CONVERSATION_CACHE
            )
        )
        module = ModuleEngine(base_url)
        stack.callback(module.close)
        server = LlamaServerEngine(args.llama_server, args.model, args.threads, scratch / "llama-server.log")
        stack.callback(server.close)
        raw = RawEngine(args.model, args.threads)
        stack.callback(raw.close)
        sampling = {"temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"], "max_tokens": args.tokens}
        extra = {name: SAMPLING[name] for name in ("top_k", "min_p", "repeat_penalty")}
        for repeat in range(args.repeats):
            for name, (prompt, schema) in SCHEMAS.items():
                body = {"model": "bench", "messages": chat_messages(prompt), **sampling, **extra}
                schema_body = {**body, "response_format": response_format(name, schema)}
                # cache_prompt off: each of llama-server's chats reads its prompt, as the module's (no cache) do.
                runs = {
                    "module_schema": partial(module.chat, schema_body),
                    "llama_server_schema": partial(llama_server_chat, server, {**schema_body, "cache_prompt": False}),
                    "module_free": partial(module.chat, body),
                    "llama_server_free": partial(llama_server_chat, server, {**body, "cache_prompt": False}),
                    "raw_free": partial(raw_chat, raw, prompt, args.tokens),
                }
                for engine, run in runs.items():
                    result = run()
                    if engine.endswith("_schema"):
                        result["valid"] = valid(result["text"], schema)
                    samples[name].setdefault(engine, []).append(result)
                    say(
                        f"repeat {repeat + 1}/{args.repeats} {name:<10} {engine:<20} {result['tokens']:>4} tokens "
                        f"{result['tokens_per_second'] or 0:7.1f} tok/s" + (" valid" if result.get("valid") else "")
                    )
    return samples


def summarise(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name, engines in samples.items():
        speeds = {engine: summary(r["tokens_per_second"] for r in runs) for engine, runs in engines.items()}
        table[name] = {
            "tokens_per_second": speeds,
            "tokens": {engine: summary(r["tokens"] for r in runs) for engine, runs in engines.items()},
            "valid": {
                engine: sum(r["valid"] for r in runs) / len(runs)
                for engine, runs in engines.items()
                if "_schema" in engine
            },
            "schema_vs_llama_server": round(
                speeds["module_schema"]["median"] / speeds["llama_server_schema"]["median"], 3
            ),
            "free_vs_raw": round(speeds["module_free"]["median"] / speeds["raw_free"]["median"], 3),
            "free_vs_llama_server": round(speeds["module_free"]["median"] / speeds["llama_server_free"]["median"], 3),
        }
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.structured", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF every engine loads")
    parser.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--threads", type=int, default=default_max_threads(), help="CPU threads of every engine")
    parser.add_argument("--tokens", type=int, default=700, help="max_tokens of every reply")
    parser.add_argument("--repeats", type=int, default=3)
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: run `bash install.sh --small` for SmolLM2-135M, or pass --model PATH")
    if not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: README's Benchmarks section says how to build it")
    if args.repeats < 1 or args.tokens < 16:
        parser.error("--repeats must be at least 1 and --tokens at least 16")
    started = time.monotonic()
    results: dict[str, Any] = {
        **machine.provenance(),
        "model": args.model.name,
        "settings": {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "n_ctx": N_CTX},
        "load_start": machine.wait_until_idle(args.wait_idle, say),
    }
    with tempfile.TemporaryDirectory(prefix="llamachat-structured-") as scratch:
        results["schemas"] = summarise(measure(args, Path(scratch)))
    conclude(results, started, "goal", structured_report.evaluate_goals, structured_report.write, args.out, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
