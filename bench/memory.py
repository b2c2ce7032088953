"""Resident memory (RSS) over many chats: the module process's, and raw llama-cpp-python's on the same chats in a
fresh process of its own, for comparison."""

import gc
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import psutil

from .workload import Settings, memory_prompt


def rss_curve(chat: Callable[[int], None], rss_mb: Callable[[], float], chats: int) -> dict[str, Any]:
    """RSS after loading, after the first chat, every 10 chats, and after the last; growth from loading and from
    the first chat (which allocates what every chat needs once)."""
    after_load = rss_mb()
    curve = [{"chats": 0, "rss_mb": round(after_load, 1)}]
    for i in range(chats):
        chat(i)
        if i == 0 or (i + 1) % 10 == 0 or i + 1 == chats:
            curve.append({"chats": i + 1, "rss_mb": round(rss_mb(), 1)})
    first, last = curve[1]["rss_mb"], curve[-1]["rss_mb"]
    return {
        "chats": chats,
        "rss_after_load_mb": curve[0]["rss_mb"],
        "rss_after_first_chat_mb": first,
        "rss_after_chats_mb": last,
        "growth_pct": round(100 * (last - curve[0]["rss_mb"]) / curve[0]["rss_mb"], 2),
        "growth_after_first_chat_pct": round(100 * (last - first) / first, 2),
        "curve": curve,
    }


def _raw_rss_curve(model: str, threads: int, chats: int, tokens: int, collect_each_chat: bool) -> dict[str, Any]:
    from .in_process import RawEngine  # imported here: this runs in the child process

    engine = RawEngine(Path(model), threads)
    me = psutil.Process()

    def chat(i: int) -> None:
        engine.chat(memory_prompt(i), [], tokens, fresh=False)
        if collect_each_chat:
            gc.collect()

    result = rss_curve(chat, lambda: me.memory_info().rss / 2**20, chats)
    engine.close()
    return result


def raw_rss_curve(model: Path, settings: Settings, collect_each_chat: bool = False) -> dict[str, Any]:
    """The same chats as the module's memory measurement, on raw llama-cpp-python in a fresh process; with
    collect_each_chat, a full garbage collection after every chat frees what only Python's cycle collector can
    (llama-cpp-python 0.3.36 leaves each completion's sampler, with its native memory, in a reference cycle)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(
            _raw_rss_curve,
            str(model),
            settings.threads,
            settings.memory_chats,
            settings.memory_chat_tokens,
            collect_each_chat,
        ).result()
