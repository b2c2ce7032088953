"""Shared fixtures, and the test layers: `model` tests load a GGUF model, `browser` tests drive chromium.

pytest -m "not model and not browser"   # the fast, model-free layer (seconds)
pytest                                   # everything (what .ci/run runs)
"""

import os
from pathlib import Path

import openai
import pytest

# (pytest.ini's pythonpath puts the repository root, the module folder, and tests/ on sys.path.)
# Nothing in the tests may reach Hugging Face: anything that tries lands on a closed loopback port and fails at once.
# Tests of the download path point HF_ENDPOINT at their local stand-in instead.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

from hf_standin import default_model_hub  # noqa: E402
from live_server import running_server  # noqa: E402
from model_paths import gemma3_path, smollm2_path  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium: never a downloaded browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# A test that uses any of these fixtures, directly or through another fixture, belongs to that layer.
LAYER_FIXTURES = {"model": {"smollm2", "gemma3"}, "browser": {"browser"}}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for marker, fixtures in LAYER_FIXTURES.items():
            if fixtures & set(getattr(item, "fixturenames", ())):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_path()


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    """A live server with the module on SmolLM2 (live_server's defaults), one per test module."""
    with running_server(smollm2) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(smollm2_server):
    """The real `openai` package on smollm2_server, without retries: a test sees the first answer."""
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="any key", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def raw_smollm2(smollm2):
    """Raw llama-cpp-python on SmolLM2, shared by the whole run: what replies are checked against (raw_reference)."""
    from live_server import module_threads
    from raw_reference import RawModel  # llama_cpp only for the model layer

    raw = RawModel(smollm2, n_ctx=2048, n_threads=module_threads())
    yield raw
    raw.close()


# One chromium per module, not per session: Playwright's sync API keeps an event loop running in the main thread
# while it is open, and any later test calling asyncio.run() there (test_server_limits.py) would fail.
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def hub(smollm2):
    """A local stand-in for the Hugging Face Hub serving the default model's repository (SmolLM2's bytes)."""
    with default_model_hub(smollm2) as standin:
        yield standin
