"""The self-test as the server's setup runs it: `<venv python> llama_chat_adapter.py --selftest` in the module folder,
with none of the module's EnvironmentVariables (and here none at all but a Hub address). It takes its settings from
modulesettings.json, uses only the model files already installed, and never downloads: the Hub it is given is a local
stand-in that offers the default model and records every request.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fetch_model import SMALL_MODEL_FILENAME, read_default_model
from hf_standin import default_model_hub
from live_server import ROOT

DEFAULT = read_default_model()


@pytest.fixture
def module_copy(tmp_path) -> Path:
    """The module's runtime files in a folder of their own, with an empty models folder."""
    folder = tmp_path / "LlamaChat"
    (folder / "llamachat").mkdir(parents=True)
    (folder / "llamachat_server").mkdir()
    runtime = [*ROOT.glob("*.py"), *ROOT.glob("modulesettings*.json"), *ROOT.glob("llamachat*/*.py")]
    for path in runtime:
        (folder / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    (folder / "models").mkdir()
    return folder


def run_setup_selftest(module_dir: Path, hub_url: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "llama_chat_adapter.py", "--selftest"],
        cwd=module_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_ENDPOINT": hub_url},
    )
    return done, time.monotonic() - started


def test_selftest_uses_the_installed_small_model_and_downloads_nothing(module_copy, smollm2):
    (module_copy / "models" / SMALL_MODEL_FILENAME).symlink_to(smollm2)
    with default_model_hub(smollm2) as hub:
        done, _ = run_setup_selftest(module_copy, hub.url)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Self-test for LlamaChat passed" in done.stdout
    assert f"model {SMALL_MODEL_FILENAME}" in done.stdout
    # modulesettings.json's model was looked for where its settings say, and not downloaded.
    assert str(module_copy / "models" / DEFAULT.filename) in done.stdout
    assert hub.requests == []
    assert not (module_copy / "models" / DEFAULT.filename).exists()


def test_selftest_without_any_model_fails_at_once_and_says_what_to_install(module_copy, smollm2):
    with default_model_hub(smollm2) as hub:
        done, seconds = run_setup_selftest(module_copy, hub.url)

    assert done.returncode == 1
    assert "Self-test failed: Unable to load a model" in done.stdout
    assert f"'{module_copy / 'models' / DEFAULT.filename}': no such file" in done.stdout
    assert f"'{module_copy / 'models' / SMALL_MODEL_FILENAME}': no such file" in done.stdout
    assert "install one with bash install.sh" in done.stdout
    assert hub.requests == []
    assert seconds < 60  # no download, no network wait: only the interpreter and llama.cpp starting
