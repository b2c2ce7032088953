"""What every benchmark prints while it runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def say(text: str) -> None:
    """A progress line, stamped with the benchmark that runs (`python -m bench.threads`: bench.threads) and the time."""
    script = Path(sys.argv[0]).stem
    name = "bench" if script == "__main__" else f"bench.{script}"
    print(f"[{name} {time.strftime('%H:%M:%S')}] {text}", flush=True)
