"""What every engine is asked, so their numbers compare: the same prompts, the same sampling, the same context."""

from dataclasses import dataclass

from llama_chat import DEFAULT_SYSTEM_PROMPT
from llamachat.model_file import SMALL_MODEL_FILENAME
from tests.live_server import ROOT

DEFAULT_MODEL = ROOT / "models" / SMALL_MODEL_FILENAME  # what `bash install.sh --small` installs
N_CTX = 4096
SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT

# Greedy decoding (temperature 0); the other values are the module's route defaults, written out so that every
# engine gets them explicitly rather than its own defaults.
SAMPLING: dict[str, float] = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}

# A prompt the model answers at length, so a run measures steady generation rather than its start and end.
GENERATION_PROMPT = "Write a long story about a dragon who learns to paint."

CONVERSATION = [
    "I'm planning a trip to Japan in spring. Which city should I start in?",
    "How many days should I spend there?",
    "What food should I try first?",
    "Is it easy to travel between cities by train?",
    "Which pass should I buy for the trains?",
    "What should I pack for the weather?",
    "Give me one tip for visiting temples.",
    "How much cash should I carry?",
    "What is a good day trip from Kyoto?",
    "Summarise my plan in three sentences.",
]

# The module's settings for the benchmarks that measure the engine from a cold start and its memory over many chats:
# the conversation cache would serve their repeated "cold" requests from RAM, and its RAM tier is growth by design.
# bench.conversations measures the cache.
NO_CONVERSATION_CACHE = {"CPAI_MODULE_LLAMA_CACHE_RAM_MB": "0", "CPAI_MODULE_LLAMA_CACHE_DISK_GB": "0"}

# A cheap chat between measurements whose system prompt differs from the workload's, so the next chat finds
# (almost) nothing of its own prompt in the KV cache: the module's cache cannot be emptied from outside.
FLUSH_SYSTEM_PROMPT = "Reply with one word."
FLUSH_PROMPT = "Say OK."


def chat_messages(prompt: str, history: list[dict[str, str]] = ()) -> list[dict[str, str]]:
    """The OpenAI-style message list for engines that take one (the module takes the same parts as form fields)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": prompt}]


def long_prompt(min_tokens: int, count_tokens) -> str:
    """A prompt of at least min_tokens tokens (counted by count_tokens(text)) for the cancel-while-reading test."""
    paragraphs = ["Summarise this text."]
    while count_tokens(" ".join(paragraphs)) < min_tokens:
        i = len(paragraphs)
        paragraphs.append(
            f"Paragraph {i}: the committee met on a rainy Tuesday to discuss the budget for the "
            f"new library, and item {i} on the agenda was the roof."
        )
    return " ".join(paragraphs)


def memory_prompt(i: int) -> str:
    """The i-th of the chats that look for memory growth: each a different prompt, as real use would be."""
    return f"Tell me one fact about the number {i + 1}."


@dataclass(frozen=True)
class Settings:
    """How much work a run does; the command line fills it."""

    repeats: int = 5
    conversation_repeats: int = 3
    conversation_turns: int = len(CONVERSATION)
    generation_tokens: int = 256
    conversation_tokens: int = 48
    long_prompt_tokens: int = 1500
    cancel_repeats: int = 5
    memory_chats: int = 100
    memory_chat_tokens: int = 16
    poll_interval_s: float = 0.25
    threads: int = 2
