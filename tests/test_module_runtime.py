"""The module's runtime on every platform, as both the real server and its setup script read the layered settings.

The setup script (src/setup.sh with src/scripts/utils.sh, server 2.9.x) makes the venv for LaunchSettings.Runtime and
the server then runs `bin/<os>/python<XY>/venv/...` for that same Runtime, so both must see the same value. The server
layers modulesettings.<os>.json, .<os>.<arch>.json (arch "x64" or "arm64") and, in Docker, .docker.json
(ModuleSupportExtensions.cs); setup reads .<os>.json and .<os>.<arch>.json with its own arch names, "x86_64" or
"arm64", and never .docker.json (utils.sh, getValueFromModuleSettingsFile).

python3.11 on every platform: the server's x64 Docker images (CPU and CUDA, Ubuntu 22.04) come with python3.11 and
its venv package, Debian 12 has it as its python3, Ubuntu 22.04 in its own archive, and on Ubuntu 24.04 setup adds the
deadsnakes archive that has it; on macOS setup installs Homebrew's python@3.11, on Windows CodeProject's own 3.11
build (the original LlamaChat module ran on it there). No platform is better served by another version, so there is
no per-OS Runtime.
"""

from __future__ import annotations

import pytest

from live_server import ROOT
from llamachat_server.settings import HostPlatform, load_module_settings

HOSTS = [
    HostPlatform("linux", "x64"),
    HostPlatform("linux", "arm64"),
    HostPlatform("linux", "x64", docker=True),
    HostPlatform("linux", "arm64", docker=True),
    HostPlatform("macos", "x64"),
    HostPlatform("macos", "arm64"),
    HostPlatform("windows", "x64"),
]


@pytest.mark.parametrize("host", HOSTS, ids=lambda host: f"{host.platform_name}{'-docker' if host.docker else ''}")
def test_every_platform_runs_the_module_on_python_3_11_in_its_own_venv(host):
    settings = load_module_settings(ROOT, host)
    assert settings.get("LaunchSettings", "Runtime") == "python3.11"
    assert settings.get("LaunchSettings", "RuntimeLocation") == "Local"


def test_only_files_that_setup_reads_too_may_set_the_runtime():
    # A Runtime in a file only the server reads would make it look for a venv that setup never made.
    server_only = [p for p in ROOT.glob("modulesettings.*.json") if ".x64." in p.name or ".docker." in p.name]
    for path in server_only:
        assert '"Runtime' not in path.read_text(), f"{path.name} sets a Runtime the server's setup never reads"


def test_module_location_is_what_the_server_records_for_a_module_in_its_modules_folder():
    # The server overwrites InstallOptions.ModuleLocation with where it found the module (Program.cs): "Internal" for
    # its modules/ folder, where the README puts LlamaChat and where the server's own installer unpacks modules.
    settings = load_module_settings(ROOT, HostPlatform("linux", "x64"))
    assert settings.get("InstallOptions", "ModuleLocation") == "Internal"
