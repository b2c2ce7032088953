"""The module's own model loading (LlamaChat) against the local Hub stand-in, and after an install without the Hub.

LlamaChat runs in a subprocess: huggingface_hub reads HF_ENDPOINT when it is imported.
"""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fetch_model import MODULE_DIR, SMALL_MODEL_FILENAME, read_default_model
from hf_standin import hub_env, unreachable_hub_url
from install_harness import fetch
from llamachat.llama_settings import LlamaSettings
from llamachat.model_file import ModelRecord, sha256_of, write_record

DEFAULT = read_default_model()
FILEGLOB = LlamaSettings.from_env({}).model_fileglob

# Loads the model the way the adapter does, then chats a few tokens; prints what happened as JSON.
LOAD_AND_CHAT = """
import json, sys
from llama_chat import LlamaChat
chat = LlamaChat(repo_id=sys.argv[1], fileglob=sys.argv[2], filename=sys.argv[3], model_dir=sys.argv[4],
                 n_ctx=512, n_threads=2)
reply = chat.do_chat("Say hello.", max_tokens=8, temperature=0.0, seed=1)
print(json.dumps({"model_path": chat.model_path, "fallback_reason": chat.fallback_reason,
                  "reply": reply["choices"][0]["message"]["content"],
                  "completion_tokens": reply["usage"]["completion_tokens"]}))
"""


def load_and_chat(env: dict, models: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_CHAT, DEFAULT.repo_id, FILEGLOB, DEFAULT.filename, str(models)],
        env=env,
        cwd=MODULE_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_missing_model_is_downloaded_at_start_then_loaded_from_disk(hub, tmp_path, smollm2):
    models = tmp_path / "models"
    first = load_and_chat(hub_env(hub.url, tmp_path), models)

    model_file = models / DEFAULT.filename
    assert Path(first["model_path"]).resolve() == model_file.resolve()
    assert model_file.is_file()
    assert filecmp.cmp(model_file, smollm2, shallow=False)
    assert hub.fetched(DEFAULT.filename)
    assert not hub.fetched(DEFAULT.filename.replace("Q4_K_M", "Q5_K_M"))  # the glob picked the one file
    assert first["fallback_reason"] is None
    assert first["reply"].strip()
    assert first["completion_tokens"] > 0

    # The next start finds the file where the download put it and needs no Hub.
    second = load_and_chat(hub_env(unreachable_hub_url(), tmp_path), models)
    assert Path(second["model_path"]).resolve() == model_file.resolve()
    assert second["fallback_reason"] is None


@pytest.mark.model  # loads the SmolLM2 that fetch_model.py sets up, without the smollm2 fixture
def test_install_without_the_hub_leaves_a_model_the_module_runs_on(tmp_path):
    env = hub_env(unreachable_hub_url(), tmp_path)
    models = tmp_path / "models"
    install = fetch(env, "--models-dir", str(models))
    assert install.returncode == 3, install.stderr

    loaded = load_and_chat(env, models)
    assert Path(loaded["model_path"]).name == SMALL_MODEL_FILENAME
    assert DEFAULT.repo_id in loaded["fallback_reason"]  # the warning says why the default model is not used
    assert loaded["reply"].strip()
    assert loaded["completion_tokens"] > 0


def test_after_an_install_with_small_the_module_runs_on_it_and_downloads_nothing(hub, tmp_path, smollm2):
    models = tmp_path / "models"
    env = hub_env(hub.url, tmp_path)  # the Hub is in reach: without the choice, the module would download
    install = fetch(env, "--models-dir", str(models), "--small")
    assert install.returncode == 0, install.stderr

    loaded = load_and_chat(env, models)
    assert Path(loaded["model_path"]).name == SMALL_MODEL_FILENAME
    assert not hub.fetched(DEFAULT.filename)
    assert not (models / DEFAULT.filename).exists()
    assert "--small" in loaded["fallback_reason"]  # the status and the log say why, and how to get the other one
    assert loaded["completion_tokens"] > 0


def test_a_truncated_model_is_not_loaded_but_downloaded_again_at_start(hub, tmp_path, smollm2):
    models = tmp_path / "models"
    models.mkdir()
    model_file = models / DEFAULT.filename
    model_file.write_bytes(smollm2.read_bytes()[: smollm2.stat().st_size // 2])
    write_record(model_file, ModelRecord(smollm2.stat().st_size, sha256_of(smollm2), "the test's record"))

    loaded = load_and_chat(hub_env(hub.url, tmp_path), models)
    assert hub.fetched(DEFAULT.filename)  # huggingface_hub saw the hash differ from the Hub's and fetched it again
    assert Path(loaded["model_path"]).resolve() == model_file.resolve()
    assert filecmp.cmp(model_file, smollm2, shallow=False)
    assert loaded["fallback_reason"] is None
    assert loaded["completion_tokens"] > 0
