"""package.sh: the LlamaChat-<version>.zip that CodeProject.AI Server installs. It is a real zip of exactly the
module's runtime files, and unzipped into an empty folder it installs, reads its settings as the server does and
passes its self-test.

The install reuses the project's venv (a `.venv` symlink, which install.sh reuses as on any re-run): a fresh venv
takes a minute with pip's wheel cache and PyPI, five without the cache, so that run is bench/package_install.py's.
"""

import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fetch_model import SMALL_MODEL_FILENAME, read_default_model
from hf_standin import hub_env, unreachable_hub_url
from live_server import ROOT
from llamachat_server.settings import HostPlatform, load_module_settings

SETTINGS = load_module_settings(ROOT)
# What the repository holds beside the module: for developers, never installed.
LEFT_OUT_FOLDERS = {"tests", "bench", "docs", ".ci"}
LEFT_OUT_FILES = {
    ".gitignore",
    "README.md",
    "pyproject.toml",
    "pytest.ini",
    "package.sh",
    "package.bat",
    "package_module.py",
}


def build_package(dest: Path, *args: str) -> subprocess.CompletedProcess:
    # From the module folder, as the server's devops/build/create_packages.sh calls it.
    return subprocess.run(
        ["bash", "package.sh", SETTINGS.module_id, SETTINGS.version, "--dest", str(dest), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("dist")
    built = build_package(dest)
    assert built.returncode == 0, built.stderr
    return dest / f"{SETTINGS.module_id}-{SETTINGS.version}.zip"


@pytest.fixture
def unpacked(package, tmp_path) -> Path:
    folder = tmp_path / SETTINGS.module_id
    folder.mkdir()
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    (folder / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return folder


def tracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"needs the git checkout: {listed.stderr.strip()}")
    return set(listed.stdout.splitlines())


def test_the_package_is_a_zip_of_exactly_the_runtime_files(package):
    assert package.name == "LlamaChat-2.0.0.zip"
    assert zipfile.is_zipfile(package)  # not a tar under a .zip name
    with zipfile.ZipFile(package) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        install_mode = archive.getinfo("install.sh").external_attr >> 16

    shipped = {
        name
        for name in tracked_files()
        if name.split("/")[0] not in LEFT_OUT_FOLDERS and name not in LEFT_OUT_FILES and ".development." not in name
    }
    assert names == shipped  # no __pycache__, model, venv or developer's settings from the working tree either
    assert {
        "llama_chat_adapter.py",
        "llamachat/__init__.py",
        "llamachat/chat_runner.py",
        "modulesettings.json",
        "requirements.txt",
        "install.sh",
        "install.bat",
    } <= names
    assert install_mode & stat.S_IXUSR


def test_bad_arguments_are_refused_without_a_zip(tmp_path):
    built = build_package(tmp_path, "--bogus")
    assert built.returncode == 2
    assert "unrecognized arguments: --bogus" in built.stderr
    built = subprocess.run(
        ["bash", "package.sh", "LlamaChat", "1.0 beta", "--dest", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 2
    assert "'1.0 beta' cannot be part of a file name" in built.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_unzipped_package_installs_and_passes_its_selftest(unpacked, tmp_path, smollm2):
    env = hub_env(unreachable_hub_url(), tmp_path)
    install = subprocess.run(
        ["bash", "install.sh", "--small"], cwd=unpacked, env=env, capture_output=True, text=True, timeout=300
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert [path.name for path in (unpacked / "models").glob("*.gguf")] == [SMALL_MODEL_FILENAME]

    # As the server's setup runs it: from the module folder, none of the module's variables set.
    selftest = subprocess.run(
        [str(unpacked / ".venv" / "bin" / "python"), "llama_chat_adapter.py", "--selftest"],
        cwd=unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "Self-test for LlamaChat passed" in selftest.stdout


def test_the_unzipped_fetch_model_reads_per_os_settings_with_comments(unpacked, hub, tmp_path):
    # A layer the server would read on this machine, written with the // comments it allows.
    other_file = read_default_model().filename.replace("Q4_K_M", "Q5_K_M")
    layer = {"Modules": {"LlamaChat": {"EnvironmentVariables": {"CPAI_MODULE_LLAMA_MODEL_FILENAME": other_file}}}}
    platform_layer = unpacked / f"modulesettings.{HostPlatform.detect().os_name}.json"
    platform_layer.write_text("// this machine's model\n" + json.dumps(layer, indent=2))

    fetched = subprocess.run(
        [sys.executable, "fetch_model.py"],
        cwd=unpacked,
        env=hub_env(hub.url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert [path.name for path in (unpacked / "models").glob("*.gguf")] == [other_file]
    assert hub.fetched(other_file)
