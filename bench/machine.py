"""The machine the numbers come from: is it idle, what is it, and how much CPU did other processes take while we
measured (a 2-core machine shared with other work gives noisy numbers; the results say how noisy)."""

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

IDLE_LOAD = 0.5  # 1-minute load average under which the machine counts as idle


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def add_wait_idle_option(parser: argparse.ArgumentParser) -> None:
    """--wait-idle SECONDS, for wait_until_idle(args.wait_idle)."""
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help=f"wait up to this long for the 1-minute load average to fall below {IDLE_LOAD:g} first",
    )


def wait_until_idle(max_wait_s: float, say=print) -> dict[str, Any]:
    """Waits up to max_wait_s for the 1-minute load to fall below IDLE_LOAD; warns when it did not."""
    started = time.monotonic()
    while load_average() >= IDLE_LOAD and time.monotonic() - started < max_wait_s:
        time.sleep(5)
    load = load_average()
    if load >= IDLE_LOAD:
        say(
            f"WARNING: the machine is busy (1-minute load average {load} >= {IDLE_LOAD}): the numbers will be noisy. "
            f"Close other work, or pass --wait-idle SECONDS to wait for it."
        )
    return {"load_1min": load, "idle": load < IDLE_LOAD, "waited_s": round(time.monotonic() - started, 1)}


def commit() -> str:
    """The commit measured, with "+changes" when the code differed from it (results files and docs do not count)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)bench/results",
        ":(exclude)docs",
        ":(exclude)*.md",
    )
    return f"{head}+changes" if changed else head


def provenance() -> dict[str, Any]:
    """What every results file starts with: when, which commit, which llama-cpp-python and which machine."""
    return {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "machine": describe(),
    }


def describe() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }


def _busy_cpu_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _our_cpu_s() -> float:
    """CPU time of this process and all it started, living or ended (children_* count the ended ones)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


@contextmanager
def phase(record: dict[str, Any], name: str) -> Iterator[None]:
    """Records, for one part of the run, its duration, the load around it, and the CPU other processes used
    (in cores, averaged over the part) -- those compete with the engine for the machine's cores."""
    started, busy, ours, load = time.monotonic(), _busy_cpu_s(), _our_cpu_s(), load_average()
    try:
        yield
    finally:
        wall = time.monotonic() - started
        others = (_busy_cpu_s() - busy) - (_our_cpu_s() - ours)
        record[name] = {
            "seconds": round(wall, 1),
            "load_before": load,
            "load_after": load_average(),
            "other_processes_cores": round(max(others, 0.0) / wall, 2) if wall else 0.0,
        }
