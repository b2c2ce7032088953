"""The measurements every engine gets, through its chat(prompt, history, max_tokens, fresh) -> metrics dict:
generation from a cold cache (time to first token, tokens/s) and a conversation (prefix reuse vs cold).

`fresh` asks the engine to start from an empty KV cache, as a cold model would. The engines take turns within
each repeat, so a change in the machine's load during the run touches them all alike and their ratios hold.
"""

from typing import Any

from llamachat.chat_types import Message

from .stats import summary
from .workload import CONVERSATION, GENERATION_PROMPT, Settings


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median and spread of every number the runs measured."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) or v is None]
    return {key: summary(run[key] for run in runs) for key in keys}


def _numbers(run: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items() if k != "text"}


def measure_generation(engines: dict[str, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    # The first chat after loading pays one-time costs (buffer allocation, template compilation): not measured.
    for engine in engines.values():
        engine.chat(GENERATION_PROMPT, [], settings.generation_tokens, fresh=True)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in engines}
    for _ in range(settings.repeats):
        for key, engine in engines.items():
            runs[key].append(engine.chat(GENERATION_PROMPT, [], settings.generation_tokens, fresh=True))
    return {
        key: {"summary": summarise(r), "runs": [_numbers(run) for run in r], "reply": r[-1]["text"]}
        for key, r in runs.items()
    }


def _conversation(engine, prompts: list[str], settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Each turn sends the whole conversation so far, as a client does; the engine may reuse the cached prefix.
    Then each turn again from a cold cache (its first token only), for comparison."""
    history: list[Message] = []
    warm = []
    for turn, prompt in enumerate(prompts):
        run = engine.chat(prompt, history, settings.conversation_tokens, fresh=turn == 0)
        warm.append(run)
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": run["text"]}]
    # After the warm pass, so these cold chats cannot disturb its cache.
    cold = [engine.chat(prompt, history[: 2 * turn], 1, fresh=True) for turn, prompt in enumerate(prompts)]
    return {"warm": warm, "cold": cold}


def measure_conversation(engines: dict[str, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    prompts = CONVERSATION[: settings.conversation_turns]
    passes: dict[str, list[dict[str, list[dict[str, Any]]]]] = {key: [] for key in engines}
    for _ in range(settings.conversation_repeats):
        for key, engine in engines.items():
            passes[key].append(_conversation(engine, prompts, settings))
    return {
        key: {
            "turns": [
                {
                    "turn": turn + 1,
                    "warm": summarise([p["warm"][turn] for p in runs]),
                    "cold": summarise([p["cold"][turn] for p in runs]),
                }
                for turn in range(len(prompts))
            ],
            "replies": [run["text"] for run in runs[-1]["warm"]],
        }
        for key, runs in passes.items()
    }
