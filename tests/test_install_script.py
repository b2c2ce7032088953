"""install.sh, both ways in: on its own (`bash install.sh`) and sourced by the server's setup
(`source install.sh install`).

The module folder is copied to a scratch folder for each test. Its `.venv` is a symlink to the project's venv:
install.sh reuses an existing .venv, as on any re-run, which spares the tests compiling llama-cpp-python.
"""

import filecmp
import shlex
from pathlib import Path

import pytest

from fetch_model import MODULE_DIR, SMALL_MODEL_FILENAME, read_default_model
from hf_standin import hub_env, unreachable_hub_url
from install_harness import copy_module, run_bash, source_like_the_server

DEFAULT = read_default_model()


@pytest.fixture
def module_dir(tmp_path) -> Path:
    folder = copy_module(tmp_path)
    (folder / ".venv").symlink_to(MODULE_DIR / ".venv", target_is_directory=True)
    return folder


def test_standalone_install_without_the_hub_ends_with_smollm2(module_dir, tmp_path, smollm2):
    install = f"bash {shlex.quote(str(module_dir / 'install.sh'))}"
    env = hub_env(unreachable_hub_url(), tmp_path)
    first = run_bash(install, env, cwd=tmp_path)  # from another folder: the script finds its own

    assert first.returncode == 0, first.stdout + first.stderr
    assert f"using the existing virtual environment {module_dir / '.venv'}" in first.stdout
    assert "cannot reach the Hugging Face Hub" in first.stdout
    assert f"Model installed: {SMALL_MODEL_FILENAME}" in first.stdout
    assert "done." in first.stdout
    assert sorted(p.name for p in (module_dir / "models").glob("*.gguf")) == [SMALL_MODEL_FILENAME]
    assert filecmp.cmp(module_dir / "models" / SMALL_MODEL_FILENAME, smollm2, shallow=False)

    again = run_bash(install, env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "The small model is already there" in again.stdout


def test_standalone_install_in_a_fresh_folder_makes_the_venv_and_stops_clearly_without_packages(module_dir, tmp_path):
    (module_dir / ".venv").unlink()
    result = run_bash(
        f"bash {shlex.quote(str(module_dir / 'install.sh'))}", hub_env(unreachable_hub_url(), tmp_path), cwd=tmp_path
    )  # hub_env gives pip no index

    assert result.returncode == 1
    assert f"creating the virtual environment {module_dir / '.venv'}" in result.stdout
    assert (module_dir / ".venv" / "bin" / "python").is_file()
    assert "pip could not install requirements.txt" in result.stderr
    assert not (module_dir / "models").exists()  # no model step after a failed setup


def test_standalone_install_rejects_unknown_options(module_dir, tmp_path):
    result = run_bash(
        f"bash {shlex.quote(str(module_dir / 'install.sh'))} --tiny",
        hub_env(unreachable_hub_url(), tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "unknown option '--tiny'" in result.stderr
    assert not (module_dir / "models").exists()


def test_sourced_by_the_server_gets_the_model_and_keeps_it_in_the_download_cache(hub, module_dir, tmp_path, smollm2):
    script = source_like_the_server(module_dir, tmp_path)
    result = run_bash(script, hub_env(hub.url, tmp_path), cwd=module_dir)

    assert "status=0" in result.stdout, result.stdout + result.stderr
    assert "errors=[]" in result.stdout
    assert "shell options unchanged" in result.stdout
    assert "working directory unchanged" in result.stdout
    assert "functions left: 0" in result.stdout
    assert hub.fetched(DEFAULT.filename)
    model_file = module_dir / "models" / DEFAULT.filename
    assert filecmp.cmp(model_file, smollm2, shallow=False)
    cached = tmp_path / "downloads" / "modules" / "assets" / module_dir.name / DEFAULT.filename
    assert filecmp.cmp(cached, smollm2, shallow=False)

    # A reinstall replaces the module folder but not the server's downloads: the model comes from the cache.
    model_file.unlink()
    reinstall = run_bash(script, hub_env(unreachable_hub_url(), tmp_path), cwd=module_dir)
    assert "status=0" in reinstall.stdout, reinstall.stdout + reinstall.stderr
    assert "download cache" in reinstall.stdout
    assert filecmp.cmp(model_file, smollm2, shallow=False)


def test_sourced_failure_sets_module_install_errors_and_returns_to_the_server(hub, module_dir, tmp_path):
    env = hub_env(hub.url, tmp_path)
    env["CPAI_MODULE_LLAMA_MODEL_REPO"] = "@nobody/no-such-repo"  # the stand-in answers: repository not found
    result = run_bash(source_like_the_server(module_dir, tmp_path), env, cwd=module_dir)

    assert "status=1" in result.stdout, result.stdout + result.stderr
    assert "errors=[Unable to install the LlamaChat model" in result.stdout
    assert "nobody/no-such-repo" in result.stderr
    assert "shell options unchanged" in result.stdout
    assert "functions left: 0" in result.stdout
    assert not list((module_dir / "models").glob("*.gguf"))


def test_sourced_without_the_server_variables_says_how_to_run_it(module_dir, tmp_path):
    script = (
        f'source {shlex.quote(str(module_dir / "install.sh"))} install\necho "status=$? errors=[$moduleInstallErrors]"'
    )
    result = run_bash(script, hub_env(unreachable_hub_url(), tmp_path), cwd=tmp_path)

    assert "status=1" in result.stdout
    assert "run 'bash install.sh' on its own instead" in result.stdout
