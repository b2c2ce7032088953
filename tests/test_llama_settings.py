"""LlamaSettings: the module's CPAI_MODULE_LLAMA_* settings, with modulesettings.json's values as defaults.

Model-free: only settings files and environments are read."""

from __future__ import annotations

import json
import shutil

import pytest

from live_server import ROOT
from llamachat.llama_settings import CHAT_FORMATS, LlamaSettings, LlamaSettingsError
from llamachat_server.settings import HostPlatform, load_module_settings, module_environment

LINUX = HostPlatform("linux", "x64")
WINDOWS = HostPlatform("windows", "x64")
DECLARED = json.loads((ROOT / "modulesettings.json").read_text())["Modules"]["LlamaChat"]["EnvironmentVariables"]
VARIABLES = [name for name in DECLARED if name.startswith("CPAI_MODULE_LLAMA_")]


def as_environment(settings: LlamaSettings) -> dict[str, str]:
    """The settings written back as the variables they came from."""
    return {
        "CPAI_MODULE_LLAMA_MODEL_DIR": str(settings.model_dir),
        "CPAI_MODULE_LLAMA_MODEL_FILENAME": settings.model_filename,
        "CPAI_MODULE_LLAMA_MODEL_REPO": settings.model_repo,
        "CPAI_MODULE_LLAMA_MODEL_FILEGLOB": settings.model_fileglob,
        "CPAI_MODULE_LLAMA_CONTEXT_SIZE": str(settings.context_size),
        "CPAI_MODULE_LLAMA_THREADS": str(settings.threads),
        "CPAI_MODULE_LLAMA_GPU_LAYERS": str(settings.gpu_layers),
        "CPAI_MODULE_LLAMA_CHAT_FORMAT": settings.chat_format,
        "CPAI_MODULE_LLAMA_QUEUE_SIZE": str(settings.queue_size),
        "CPAI_MODULE_LLAMA_RESULT_TTL": str(settings.result_ttl),
        "CPAI_MODULE_LLAMA_PARALLEL": str(settings.parallel),
        "CPAI_MODULE_LLAMA_CACHE_RAM_MB": str(settings.cache_ram_mb),
        "CPAI_MODULE_LLAMA_CACHE_DISK_GB": f"{settings.cache_disk_gb:g}",
        "CPAI_MODULE_LLAMA_CACHE_DIR": str(settings.cache_dir),
        "CPAI_MODULE_LLAMA_DRAFT_TOKENS": str(settings.draft_tokens),
    }


def test_every_setting_is_declared_in_modulesettings():
    assert sorted(VARIABLES) == sorted(as_environment(LlamaSettings.from_env({}, host=LINUX)))


def test_defaults_are_what_the_server_passes_from_modulesettings(tmp_path):
    # With no variable set (the setup's self-test), the module sees exactly what a server would have given it.
    settings = LlamaSettings.from_env({}, host=LINUX)
    server_env = module_environment(
        load_module_settings(ROOT, LINUX), port=1, python="python", data_dir=tmp_path, base_env={}, host=LINUX
    )
    expected = {name: server_env[name] for name in VARIABLES}
    for folder in ("CPAI_MODULE_LLAMA_MODEL_DIR", "CPAI_MODULE_LLAMA_CACHE_DIR"):
        expected[folder] = str((ROOT / server_env[folder]).resolve())
    assert as_environment(settings) == expected

    assert settings.model_dir == ROOT / "models"
    assert settings.model_repo == DECLARED["CPAI_MODULE_LLAMA_MODEL_REPO"].lstrip("@")
    assert settings.context_size == int(DECLARED["CPAI_MODULE_LLAMA_CONTEXT_SIZE"])
    assert (settings.threads, settings.gpu_layers, settings.chat_format) == (0, -1, "")
    assert (settings.queue_size, settings.result_ttl, settings.parallel) == (16, 300, 1)
    assert (settings.cache_ram_mb, settings.cache_disk_gb, settings.cache_dir) == (512, 4, ROOT / "conversation-cache")
    assert settings.draft_tokens == 0  # speculative decoding is off until it is shown to pay (docs/speculative.md)


def test_the_environment_overrides_every_default(tmp_path):
    env = {
        "CPAI_MODULE_LLAMA_MODEL_DIR": str(tmp_path / "elsewhere"),
        "CPAI_MODULE_LLAMA_MODEL_FILENAME": "tiny.Q8_0.gguf",
        "CPAI_MODULE_LLAMA_MODEL_REPO": "someone/tiny-GGUF",
        "CPAI_MODULE_LLAMA_MODEL_FILEGLOB": "*.Q8_0.gguf",
        "CPAI_MODULE_LLAMA_CONTEXT_SIZE": "512",
        "CPAI_MODULE_LLAMA_THREADS": " 3 ",  # surrounding blanks, as a hand-edited setting may have
        "CPAI_MODULE_LLAMA_GPU_LAYERS": "0",
        "CPAI_MODULE_LLAMA_CHAT_FORMAT": "gemma",
        "CPAI_MODULE_LLAMA_QUEUE_SIZE": "0",
        "CPAI_MODULE_LLAMA_RESULT_TTL": "5",
        "CPAI_MODULE_LLAMA_PARALLEL": "4",
        "CPAI_MODULE_LLAMA_CACHE_RAM_MB": "0",
        "CPAI_MODULE_LLAMA_CACHE_DISK_GB": "0.5",
        "CPAI_MODULE_LLAMA_CACHE_DIR": str(tmp_path / "conversations"),
        "CPAI_MODULE_LLAMA_DRAFT_TOKENS": "0",
    }
    settings = LlamaSettings.from_env(env, host=LINUX)
    assert as_environment(settings) == {**env, "CPAI_MODULE_LLAMA_THREADS": "3"}


def test_an_empty_variable_means_its_default_as_in_the_sdk():
    empty = LlamaSettings.from_env({name: "" for name in VARIABLES}, host=LINUX)
    assert empty == LlamaSettings.from_env({}, host=LINUX)


def test_a_relative_model_dir_is_relative_to_the_module_folder_and_an_at_sign_is_forgiven():
    settings = LlamaSettings.from_env(
        {"CPAI_MODULE_LLAMA_MODEL_DIR": "gguf/../weights", "CPAI_MODULE_LLAMA_MODEL_REPO": "@someone/tiny-GGUF"},
        host=LINUX,
    )
    assert settings.model_dir == ROOT / "weights"
    assert settings.model_repo == "someone/tiny-GGUF"


def test_per_os_layers_change_the_defaults(tmp_path):
    for name in ("modulesettings.json", "llama_chat_adapter.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "modulesettings.linux.json").write_text(
        json.dumps({"Modules": {"LlamaChat": {"EnvironmentVariables": {"CPAI_MODULE_LLAMA_CONTEXT_SIZE": "2048"}}}})
    )

    assert LlamaSettings.from_env({}, tmp_path, LINUX).context_size == 2048
    assert LlamaSettings.from_env({}, tmp_path, WINDOWS).context_size == 4096
    # '@' keeps the repo's '/' on Windows, where the server turns other slashes into backslashes.
    assert LlamaSettings.from_env({}, tmp_path, WINDOWS).model_repo == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        (
            "CPAI_MODULE_LLAMA_CONTEXT_SIZE",
            "lots",
            "CPAI_MODULE_LLAMA_CONTEXT_SIZE must be a whole number of at least 256, not 'lots'",
        ),
        ("CPAI_MODULE_LLAMA_CONTEXT_SIZE", "128", "at least 256, not '128' (the tokens the model sees at once"),
        ("CPAI_MODULE_LLAMA_CONTEXT_SIZE", "4096.5", "whole number"),
        (
            "CPAI_MODULE_LLAMA_THREADS",
            "-1",
            "CPAI_MODULE_LLAMA_THREADS must be a whole number of at least 0, not '-1' (CPU threads for the model; "
            "0 chooses them automatically)",
        ),
        (
            "CPAI_MODULE_LLAMA_GPU_LAYERS",
            "-2",
            "CPAI_MODULE_LLAMA_GPU_LAYERS must be a whole number of at least -1, not '-2' "
            "(model layers offloaded to a GPU; -1 = all, 0 = none)",
        ),
        ("CPAI_MODULE_LLAMA_GPU_LAYERS", "all", "at least -1, not 'all'"),
        (
            "CPAI_MODULE_LLAMA_QUEUE_SIZE",
            "-1",
            "CPAI_MODULE_LLAMA_QUEUE_SIZE must be a whole number of at least 0, not '-1' (chats that may wait while "
            "another runs; 0 = none may wait)",
        ),
        ("CPAI_MODULE_LLAMA_QUEUE_SIZE", "sixteen", "at least 0, not 'sixteen'"),
        (
            "CPAI_MODULE_LLAMA_PARALLEL",
            "0",
            "CPAI_MODULE_LLAMA_PARALLEL must be a whole number of at least 1, not '0' (chats decoded together, each "
            "with its own context; 1 = one at a time)",
        ),
        (
            "CPAI_MODULE_LLAMA_RESULT_TTL",
            "0",
            "CPAI_MODULE_LLAMA_RESULT_TTL must be a whole number of at least 1, not '0' (seconds a finished chat's "
            "reply stays readable, e.g. 300)",
        ),
        ("CPAI_MODULE_LLAMA_RESULT_TTL", "5m", "at least 1, not '5m'"),
        (
            "CPAI_MODULE_LLAMA_MODEL_FILENAME",
            "models/mistral.gguf",
            "CPAI_MODULE_LLAMA_MODEL_FILENAME must be the name of a .gguf file, without a folder (that goes in "
            "CPAI_MODULE_LLAMA_MODEL_DIR), not 'models/mistral.gguf'",
        ),
        ("CPAI_MODULE_LLAMA_MODEL_FILENAME", "mistral.bin", "must be the name of a .gguf file"),
        (
            "CPAI_MODULE_LLAMA_MODEL_REPO",
            "https://huggingface.co/TheBloke/x",
            "CPAI_MODULE_LLAMA_MODEL_REPO must be a Hugging Face repo id like "
            "'TheBloke/Mistral-7B-Instruct-v0.2-GGUF', or empty for no download, not 'https://huggingface.co/TheBloke/x'",
        ),
        ("CPAI_MODULE_LLAMA_MODEL_FILEGLOB", " ", "CPAI_MODULE_LLAMA_MODEL_FILEGLOB is empty"),
        ("CPAI_MODULE_LLAMA_MODEL_DIR", " ", "CPAI_MODULE_LLAMA_MODEL_DIR is empty"),
        ("CPAI_MODULE_LLAMA_CACHE_DIR", " ", "CPAI_MODULE_LLAMA_CACHE_DIR is empty: set it to the folder that holds"),
        (
            "CPAI_MODULE_LLAMA_CACHE_RAM_MB",
            "1.5",
            "CPAI_MODULE_LLAMA_CACHE_RAM_MB must be a whole number of at least 0, not '1.5' (MB of RAM for "
            "conversations' KV states, e.g. 512; 0 = none)",
        ),
        (
            "CPAI_MODULE_LLAMA_CACHE_DISK_GB",
            "-1",
            "CPAI_MODULE_LLAMA_CACHE_DISK_GB must be a number of at least 0, not '-1' (GB of disk for "
            "conversations' KV states, e.g. 4; 0 = none)",
        ),
        ("CPAI_MODULE_LLAMA_CACHE_DISK_GB", "nan", "at least 0, not 'nan'"),
        (
            "CPAI_MODULE_LLAMA_DRAFT_TOKENS",
            "64",
            "CPAI_MODULE_LLAMA_DRAFT_TOKENS must be a whole number from 0 to 32, not '64' (the most tokens drafted "
            "from the conversation and checked in one pass, e.g. 16; 0 = no speculative decoding)",
        ),
        ("CPAI_MODULE_LLAMA_DRAFT_TOKENS", "-1", "from 0 to 32, not '-1'"),
        ("CPAI_MODULE_LLAMA_DRAFT_TOKENS", "on", "from 0 to 32, not 'on'"),
        ("CPAI_MODULE_LLAMA_CACHE_DISK_GB", "inf", "at least 0, not 'inf'"),
        (
            "CPAI_MODULE_LLAMA_CHAT_FORMAT",
            "llama-2",
            "CPAI_MODULE_LLAMA_CHAT_FORMAT must be one of chatml, gemma, phi3, or empty to use the model's own chat "
            "template, not 'llama-2'",
        ),
    ],
)
def test_each_bad_value_is_refused_with_what_is_allowed(name, value, expected):
    with pytest.raises(LlamaSettingsError) as refused:
        LlamaSettings.from_env({name: value}, host=LINUX)
    assert expected in str(refused.value)
    assert isinstance(refused.value, ValueError)  # what the adapter reports as its load error


def test_a_setting_without_a_default_must_be_set(tmp_path):
    settings = json.loads((ROOT / "modulesettings.json").read_text())
    del settings["Modules"]["LlamaChat"]["EnvironmentVariables"]["CPAI_MODULE_LLAMA_THREADS"]
    (tmp_path / "modulesettings.json").write_text(json.dumps(settings))
    shutil.copy(ROOT / "llama_chat_adapter.py", tmp_path)

    with pytest.raises(
        LlamaSettingsError,
        match="CPAI_MODULE_LLAMA_THREADS is not set, and the EnvironmentVariables "
        "of .*modulesettings.json give it no default",
    ):
        LlamaSettings.from_env({}, tmp_path, LINUX)
    assert LlamaSettings.from_env({"CPAI_MODULE_LLAMA_THREADS": "2"}, tmp_path, LINUX).threads == 2


def test_an_unreadable_settings_file_is_a_settings_error(tmp_path):
    (tmp_path / "modulesettings.json").write_text("{ not json")
    with pytest.raises(LlamaSettingsError, match="is not valid JSON"):
        LlamaSettings.from_env({}, tmp_path, LINUX)


def test_chat_formats_are_the_templates_the_module_has():
    from llamachat.chat_template import TEMPLATES

    assert set(CHAT_FORMATS) == set(TEMPLATES)
