"""What the install tests share: a module folder as a user has it, bash run as the server's setup runs it, and
fetch_model.py run as install.sh runs it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fetch_model import MODULE_DIR
from package_module import runtime_files

PROJECT_PYTHON = MODULE_DIR / ".venv" / "bin" / "python"


def copy_module(tmp_path: Path) -> Path:
    """A module folder as a user has it: the files the package ships (package_module.py), nothing else."""
    folder = tmp_path / "LlamaChat"
    for name in runtime_files():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIR / name, folder / name)
    return folder


def run_bash(script: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def source_like_the_server(module_dir: Path, tmp_path: Path, python: Path = PROJECT_PYTHON) -> str:
    """A bash script that sets the variables the server's setup.sh gives install scripts, sources install.sh
    the way it does, then reports what the script left in the shell that sourced it."""
    server_vars = {
        "moduleDirPath": module_dir,
        "moduleDirName": module_dir.name,
        "venvPythonCmdPath": python,
        "downloadDirPath": tmp_path / "downloads",
        "modulesDir": "modules",
        "assetsDir": "assets",
        "verbosity": "quiet",
        "moduleInstallErrors": "",
    }
    assignments = "\n".join(f"{name}={shlex.quote(str(value))}" for name, value in server_vars.items())
    return f"""{assignments}
options_before="$(set +o) $-"; dir_before="$PWD"
source "$moduleDirPath/install.sh" install
echo "status=$?"
echo "errors=[$moduleInstallErrors]"
[ "$(set +o) $-" = "$options_before" ] && echo "shell options unchanged"
[ "$PWD" = "$dir_before" ] && echo "working directory unchanged"
echo "functions left: $(declare -F | grep -c llamachat_)"
"""


def fetch(env: dict, *args: str, python_options: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_options, str(MODULE_DIR / "fetch_model.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def gguf_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.gguf"))
