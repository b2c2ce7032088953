"""How many CPU threads llama.cpp gets: a pinned count, or (the default) as many as the machine has cores free.

Why adapt: llama.cpp's threads meet at a barrier after every step of the model (~600 per generated token), and
libgomp (its OpenMP) spin-waits there. When the module cannot get as many cores at once as it has threads, a thread
spins for its whole time slice waiting for one that is not running, at every barrier. On Linux this happens as soon
as another process group wants a core: the scheduler shares the CPU fairly between sessions (autogroup) or cgroups
(systemd services, containers) first and between threads second, so a module in a session of its own gets ONE core
for its two threads when one process elsewhere keeps the other core busy. Measured on the 2-core test machine with
SmolLM2 (bench/threads.py, docs/threads.md): 2 threads fell from ~135 to ~1.5 tokens/s; 1 thread kept ~130.
Fewer threads than the free cores never collapse; so each chat takes the cores the others leave free.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Callable

import psutil

# Others may use this much of a core before the module gives up a thread (our own server answering polls, say).
# Measured with 2 threads beside a process in another session using part of a core: 0.15 of a core already cost
# generation 10 % against 1 thread (126 vs 141 tokens/s), 0.3 cost 25 %, 0.5 cost 45 %.
TOLERATED_CORE_SHARE = 0.1
SAMPLE_INTERVAL_S = 0.5  # how often the load is read, and how often a running reply may change its count


def usable_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask, e.g. `taskset` or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_max_threads() -> int:
    """All physical cores this process may use: hyperthread siblings slow llama.cpp down rather than help it."""
    return max(1, min(psutil.cpu_count(logical=False) or usable_cpus(), usable_cpus()))


def threads_for(others_cores: float, cpus: int, max_threads: int) -> int:
    """The thread count for a moment when other processes use `others_cores` of the `cpus` usable CPUs: the cores
    left free (allowing others a small share of one of them), at least 1, at most max_threads."""
    free = cpus - max(others_cores, 0.0)
    return max(1, min(max_threads, math.floor(free + TOLERATED_CORE_SHARE)))


def _machine_busy_s() -> float:
    """CPU seconds every CPU has spent working since boot (guest time is already inside user and nice).

    Steal time (a virtual machine's CPU taken by the hypervisor) is left out: it is no process competing with ours in
    this kernel's scheduler, so fewer threads would not avoid it, and on the 2-core test VM it came and went at
    0.02-0.08 of a core, enough to cost a thread now and then on an idle machine."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _own_busy_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


class OtherLoad:
    """How many cores other processes kept busy lately: the machine's busy time minus this process's, over windows of
    SAMPLE_INTERVAL_S or more, read by a background thread that wakes twice a second (a few microseconds each).

    What counts is the lower of the last two windows: a load must fill a window and the next to cost a thread. A
    burst (our server answering a poll, the client sending it, a tick of accounting noise) shows in one window only
    and cost the idle module a thread now and then (0.89x raw speed with a client polling 4 times a second); a
    process that keeps a core busy is seen within two windows, and a core left free is taken back after one."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last = self._reading()
        self._windows = (0.0, 0.0)  # the last two windows' readings, newest last
        self._measured = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._thread.start()

    @staticmethod
    def _reading() -> tuple:
        return time.monotonic(), _machine_busy_s(), _own_busy_s()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def sample(self) -> float:
        """Ends a window: others' use in cores since the last sample."""
        now = self._reading()
        wall = now[0] - self._last[0]
        if wall > 0:
            cores = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall)
            # The first window stands for both: nothing was seen before it.
            self._windows = (self._windows[1] if self._measured.is_set() else cores, cores)
            self._last = now
            self._measured.set()
        return self._windows[1]

    def cores(self) -> float:
        """Others' sustained use in cores (the lower of the last two windows); the first call waits for the first
        full window."""
        self._measured.wait(self._interval_s * 2)
        return min(self._windows)

    def close(self) -> None:
        self._stop.set()


class ThreadPolicy:
    """The thread count for llama.cpp, chosen again at the start of every chat and every SAMPLE_INTERVAL_S of it.

    pinned > 0 (CPAI_MODULE_LLAMA_THREADS) fixes the count; 0 makes it adaptive. set_threads(n) applies a count to
    the model (llama_set_n_threads, for the prompt and for generation alike: both compute with the same barriers).
    """

    def __init__(
        self,
        pinned: int = 0,
        max_threads: int | None = None,
        load: OtherLoad | None = None,
        cpus: int | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.adaptive = pinned <= 0
        self.max_threads = pinned if pinned > 0 else (max_threads or default_max_threads())
        self.cpus = cpus or usable_cpus()
        self._load = (load or OtherLoad()) if self.adaptive else None
        self._log = log
        self.threads = self.max_threads
        self._checked_at = float("-inf")

    @property
    def mode(self) -> str:
        return "adaptive" if self.adaptive else "fixed"

    def update(self, set_threads: Callable[[int], None], force: bool = False) -> int:
        """Re-chooses the count when SAMPLE_INTERVAL_S has passed (or force), applies it if it changed, returns it."""
        if self._load is None or (not force and time.monotonic() - self._checked_at < SAMPLE_INTERVAL_S):
            return self.threads  # pinned (no load is measured), or checked a moment ago
        self._checked_at = time.monotonic()
        others = self._load.cores()
        threads = threads_for(others, self.cpus, self.max_threads)
        if threads != self.threads:
            set_threads(threads)
            self._log(
                f"info: llama.cpp now uses {threads} of {self.max_threads} threads: other processes use "
                f"{others:.1f} of {self.cpus} CPUs"
            )
            self.threads = threads
        return threads

    def close(self) -> None:
        if self._load is not None:
            self._load.close()
