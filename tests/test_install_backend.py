"""install.sh on its own picks the llama.cpp build for the machine and says which: CUDA when nvidia-smi reports an
NVIDIA GPU (unless --cpu); a prebuilt wheel from llama-cpp-python's index when that can be reached, else PyPI's source.

Nothing here reaches the network: the package indexes are a local HTTP server on 127.0.0.1 that has no packages and
records what pip asks for, or a loopback port that never answers. This machine has no NVIDIA GPU, so the GPU case
runs with a fake nvidia-smi (a script printing what the real one prints on a CUDA 12.4 machine) first on PATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fetch_model import MODULE_DIR
from hf_standin import hub_env, unreachable_hub_url
from install_harness import copy_module, run_bash, source_like_the_server

# What the fake nvidia-smi prints: with -L its GPU list, else the header of its table, which carries the CUDA version.
FAKE_NVIDIA_SMI_GPU_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
FAKE_NVIDIA_SMI_OUTPUT = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


class EmptyPackageIndex:
    """A PEP 503 index on loopback with no packages: every project page is empty. `paths` records each request."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                index.paths.append(self.path)
                body = b"<!DOCTYPE html><html><body></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def package_index() -> Iterator[EmptyPackageIndex]:
    index = EmptyPackageIndex()
    yield index
    index.close()


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A loopback URL that takes connections and never answers, like an index behind a firewall that drops packets."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/whl/cpu"


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtual environment with pip and nothing else, as install.sh makes it; shared, since no test installs into it
    (the package indexes here have no packages)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([shutil.which("python3.11") or "python3", "-m", "venv", str(venv)], check=True, timeout=120)
    return venv


def install(module_dir: Path, env: dict, *args: str):
    return run_bash(shlex.join(["bash", str(module_dir / "install.sh"), *args]), env, cwd=module_dir.parent)


def without_nvidia_smi(path: str) -> str:
    return os.pathsep.join(p for p in path.split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())


def fresh_venv_env(tmp_path: Path, pypi: str, wheel_index: str) -> dict:
    """pip reaches only `pypi` (PIP_INDEX_URL) and the wheel index install.sh is told about."""
    env = hub_env(unreachable_hub_url(), tmp_path)
    del env["PIP_NO_INDEX"]
    env.update(PIP_INDEX_URL=pypi, PIP_RETRIES="0", LLAMACHAT_WHEEL_INDEX=wheel_index)
    return env


def test_a_reachable_wheel_index_gives_pip_the_prebuilt_wheels(tmp_path, bare_venv, package_index):
    module_dir = copy_module(tmp_path)
    (module_dir / ".venv").symlink_to(bare_venv, target_is_directory=True)  # no llama-cpp-python in it
    env = fresh_venv_env(tmp_path, f"{package_index.url}/pypi/", f"{package_index.url}/whl/cpu")
    result = install(module_dir, env, "--small", "--cpu")

    assert (
        f"installing requirements.txt: llama-cpp-python as a prebuilt CPU wheel from {package_index.url}/whl/cpu"
        in (result.stdout)
    )
    # pip looked in the wheel index too; the stand-in has no packages, so the install stops with a clear error.
    assert any(path.startswith("/whl/cpu/") for path in package_index.paths), package_index.paths
    assert result.returncode == 1
    assert "pip could not install requirements.txt" in result.stderr
    assert not (module_dir / "models").exists()


def test_an_unreachable_wheel_index_means_pypis_source_without_waiting_on_it(
    tmp_path, bare_venv, package_index, silent_port
):
    module_dir = copy_module(tmp_path)
    (module_dir / ".venv").symlink_to(bare_venv, target_is_directory=True)
    env = fresh_venv_env(tmp_path, f"{package_index.url}/pypi/", silent_port)
    result = install(module_dir, env, "--small")

    assert f"{silent_port} cannot be reached (timed out)" in result.stdout, result.stdout + result.stderr
    assert "llama-cpp-python compiled from PyPI's source" in result.stdout
    # pip never got the silent index (it would wait and retry on it); it asked PyPI, here the empty stand-in.
    assert f"Looking in indexes: {package_index.url}/pypi/\n" in result.stdout
    assert package_index.paths
    assert all(path.startswith("/pypi/") for path in package_index.paths)
    assert result.returncode == 1
    assert "pip could not install requirements.txt" in result.stderr


def test_wheel_index_none_compiles_for_this_cpu_without_asking_any_index(tmp_path, bare_venv, package_index):
    module_dir = copy_module(tmp_path)
    (module_dir / ".venv").symlink_to(bare_venv, target_is_directory=True)
    result = install(module_dir, fresh_venv_env(tmp_path, f"{package_index.url}/pypi/", "none"), "--small")

    assert "LLAMACHAT_WHEEL_INDEX=none: installing requirements.txt with llama-cpp-python compiled" in result.stdout
    assert f"Looking in indexes: {package_index.url}/pypi/\n" in result.stdout
    assert result.returncode == 1
    assert "pip could not install requirements.txt" in result.stderr


@pytest.fixture
def fake_nvidia_smi(tmp_path) -> Path:
    folder = tmp_path / "fake-nvidia-bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(
        f"#!/bin/sh\nif [ \"$1\" = -L ]; then echo '{FAKE_NVIDIA_SMI_GPU_LIST}'; exit 0; fi\n"
        f"cat <<'EOF'\n{FAKE_NVIDIA_SMI_OUTPUT}EOF\n"
    )
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize(
    "args, requirements, said",
    [
        (["--small"], "requirements.linux.cuda12.txt", "NVIDIA GPU with CUDA 12.4 (nvidia-smi): installing"),
        (["--small", "--cpu"], "requirements.txt", "--cpu: installing requirements.txt (llama.cpp for the CPU only)"),
    ],
)
def test_an_nvidia_gpu_gets_the_cuda_requirements_unless_cpu_is_asked_for(
    tmp_path, fake_nvidia_smi, smollm2, args, requirements, said
):
    module_dir = copy_module(tmp_path)
    # The project's venv as .venv (as on a re-run): its llama-cpp-python, a CPU build, is installed already.
    (module_dir / ".venv").symlink_to(MODULE_DIR / ".venv", target_is_directory=True)
    env = hub_env(unreachable_hub_url(), tmp_path)
    env["PATH"] = f"{fake_nvidia_smi}{os.pathsep}{env['PATH']}"
    result = install(module_dir, env, *args)

    assert result.returncode == 0, result.stdout + result.stderr
    assert said in result.stdout
    assert f"checking {requirements} (llama-cpp-python is installed already)" in result.stdout
    cpu_build_warning = "the installed llama-cpp-python is a CPU-only build, so LlamaChat will not use the GPU"
    assert (cpu_build_warning in result.stdout) == (requirements != "requirements.txt")


def test_without_nvidia_smi_the_cpu_build_is_installed(tmp_path, smollm2):
    module_dir = copy_module(tmp_path)
    (module_dir / ".venv").symlink_to(MODULE_DIR / ".venv", target_is_directory=True)
    env = hub_env(unreachable_hub_url(), tmp_path)
    env["PATH"] = without_nvidia_smi(env["PATH"])
    result = install(module_dir, env, "--small")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no NVIDIA GPU (no nvidia-smi): installing requirements.txt (llama.cpp for the CPU only)" in result.stdout


@pytest.mark.parametrize("gpu", [False, True], ids=["cuda-toolkit-without-gpu", "cuda-with-gpu"])
def test_sourced_by_setup_with_cuda_but_no_gpu_the_cpu_build_goes_in_first(tmp_path, fake_nvidia_smi, smollm2, gpu):
    module_dir = copy_module(tmp_path)
    env = hub_env(unreachable_hub_url(), tmp_path)  # the model: SmolLM2, since no Hub answers
    env["PATH"] = without_nvidia_smi(env["PATH"])
    if gpu:
        env["PATH"] = f"{fake_nvidia_smi}{os.pathsep}{env['PATH']}"
    # What setup.sh has set by the time it sources install.sh on a machine where it found CUDA 13.0 (utils.sh 562-590).
    script = "installGPU=true\nhasCUDA=true\ncuda_version=13.0\n" + source_like_the_server(module_dir, tmp_path)
    result = run_bash(script, env, cwd=module_dir)

    assert "status=0" in result.stdout, result.stdout + result.stderr
    assert "errors=[]" in result.stdout, result.stdout + result.stderr
    assert "shell options unchanged" in result.stdout
    assert "functions left: 0" in result.stdout
    cpu_first = "setup found CUDA 13.0 but nvidia-smi lists no NVIDIA GPU: installing llama.cpp for the CPU now"
    assert (cpu_first in result.stdout) == (not gpu)
    # The project's venv stands in for setup's: its llama-cpp-python is there, so nothing is installed.
    assert ("checking requirements.txt (llama-cpp-python is installed already)" in result.stdout) == (not gpu)
