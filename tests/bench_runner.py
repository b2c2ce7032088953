"""Runs a benchmark (`python -m bench...`) as a person would, for the benchmarks' smoke tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from live_server import ROOT


def run_bench(module: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root; the finished process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def bench_results(module: str, out: Path, files: set[str], *args: str) -> Path:
    """Runs `module` writing into `out`, checks that it succeeded and wrote exactly `files`; returns `out`."""
    done = run_bench(module, "--out", str(out), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == files
    return out
