"""A module's settings as the real server reads them, and the environment it starts the module with.

modulesettings.json is layered with its per-OS variants (docs/protocol.md §3) using .NET configuration rules:
objects merge key by key (keys compare case-insensitively), arrays merge index by index, scalars
replace, nothing is ever deleted. The environment is built as the real server builds it
(docs/protocol.md §1.1): global variables, then the module's EnvironmentVariables (with `@` and macro handling),
then the CPAI_* values the server adds only where the module did not set them.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import commentjson

SETTINGS_FILENAME = "modulesettings.json"
# Set only by our standalone server, never by the real one: the number of the inherited pipe the module writes its
# replies' pieces to as they grow (docs/protocol.md §1.10). Here because both sides read it.
REPLY_CHANNEL_VARIABLE = "LLAMACHAT_REPLY_CHANNEL_FD"


class SettingsError(Exception):
    """The module's settings cannot be used; the message names the file and what to fix."""


@dataclass(frozen=True)
class HostPlatform:
    """What selects the per-OS settings layers and fills the %OS% / %PLATFORM% macros."""

    os_name: str  # windows | linux | macos
    arch: str  # x64 | arm64
    docker: bool = False
    device: str | None = None  # raspberrypi | orangepi | radxarock | jetson

    @classmethod
    def detect(cls) -> HostPlatform:
        system = platform.system().lower()
        os_name = {"darwin": "macos", "windows": "windows"}.get(system, "linux")
        arch = "arm64" if platform.machine().lower() in ("arm64", "aarch64") else "x64"
        docker = Path("/.dockerenv").exists() or os.environ.get("DOTNET_RUNNING_IN_CONTAINER") == "true"
        return cls(os_name, arch, docker, _edge_device())

    @property
    def platform_name(self) -> str:
        return self.os_name if self.arch == "x64" else f"{self.os_name}-{self.arch}"

    def layer_filenames(self) -> list[str]:
        """The settings files in the order they are applied; later ones override earlier ones."""
        stems = ["", f".{self.os_name}", f".{self.os_name}.{self.arch}"]
        if self.docker:
            stems.append(".docker")
        if self.device:
            stems.append(f".{self.device}")
        names = []
        for stem in stems:
            names += [f"modulesettings{stem}.json", f"modulesettings{stem}.development.json"]
        return names


def _edge_device() -> str | None:
    model_file = Path("/proc/device-tree/model")
    try:
        model = model_file.read_text(errors="replace").lower()
    except OSError:
        return None
    for marker, device in (
        ("raspberry", "raspberrypi"),
        ("orange", "orangepi"),
        ("radxa", "radxarock"),
        ("jetson", "jetson"),
    ):
        if marker in model:
            return device
    return None


def merge_layer(base: Any, override: Any) -> Any:
    """`override` applied on top of `base` the way .NET configuration binding sees layered JSON files."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        spelling = {key.lower(): key for key in merged}
        for key, value in override.items():
            existing = spelling.get(key.lower(), key)
            merged[existing] = merge_layer(merged[existing], value) if existing in merged else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        items = list(base)
        for index, value in enumerate(override):
            if index < len(items):
                items[index] = merge_layer(items[index], value)
            else:
                items.append(value)
        return items
    return override


def lookup(obj: Any, *keys: str, default: Any = None) -> Any:
    """obj[k1][k2]... with .NET's case-insensitive keys; `default` when any step is missing or null."""
    for key in keys:
        if not isinstance(obj, dict):
            return default
        matches = [value for name, value in obj.items() if name.lower() == key.lower()]
        if not matches or matches[-1] is None:
            return default
        obj = matches[-1]
    return obj


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in str(version).split("-")[0].split("."))


@dataclass(frozen=True)
class ModuleSettings:
    """One module's merged settings (the object under Modules.<ModuleId>) and the folder it lives in."""

    module_id: str
    module_dir: Path
    config: dict

    def get(self, *keys: str, default: Any = None) -> Any:
        return lookup(self.config, *keys, default=default)

    @property
    def name(self) -> str:
        return self.get("Name", default=self.module_id)

    @property
    def version(self) -> str:
        # The real server forces Version to the newest ModuleReleases entry.
        releases = [lookup(r, "ModuleVersion") for r in self.get("InstallOptions", "ModuleReleases", default=[])]
        releases = [r for r in releases if r]
        return max(releases, key=_version_key) if releases else str(self.get("Version", default=""))

    @property
    def queue(self) -> str:
        return (self.get("LaunchSettings", "Queue") or f"{self.module_id}_queue").lower()

    @property
    def start_file(self) -> Path:
        return self.module_dir / self.get("LaunchSettings", "FilePath")

    @property
    def parallelism(self) -> int:
        return int(self.get("LaunchSettings", "Parallelism", default=0) or 0)

    @property
    def log_verbosity(self) -> str:
        verbosity = str(self.get("LaunchSettings", "LogVerbosity", default="Quiet"))
        return "Info" if verbosity.lower() == "unknown" else verbosity

    @property
    def enable_gpu(self) -> bool:
        return bool(self.get("GpuOptions", "InstallGPU", default=True)) and bool(
            self.get("GpuOptions", "EnableGPU", default=True)
        )

    @property
    def environment_variables(self) -> dict[str, Any]:
        return dict(self.get("EnvironmentVariables", default={}))

    @property
    def route_maps(self) -> list[dict]:
        return list(self.get("RouteMaps", default=[]))


def _read_settings_file(path: Path) -> dict:
    try:
        data = commentjson.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as ex:
        raise SettingsError(f"Cannot read {path}: {ex.strerror}") from ex
    except ValueError as ex:
        raise SettingsError(f"{path} is not valid JSON (comments are allowed): {ex.args[0]}") from ex
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a JSON object with a 'Modules' section")
    return data


def load_module_settings(module_dir: Path, host: HostPlatform | None = None) -> ModuleSettings:
    """The settings of the module in `module_dir`, layered for `host` (default: this machine)."""
    module_dir = Path(module_dir).resolve()
    host = host or HostPlatform.detect()
    if not (module_dir / SETTINGS_FILENAME).is_file():
        raise SettingsError(f"{module_dir} is not a module folder: it has no {SETTINGS_FILENAME}")

    merged: dict = {}
    for filename in host.layer_filenames():
        path = module_dir / filename
        if path.is_file():
            merged = merge_layer(merged, _read_settings_file(path))

    modules = lookup(merged, "Modules", default={})
    if not isinstance(modules, dict) or not modules:
        raise SettingsError(f"{module_dir / SETTINGS_FILENAME} has no module under 'Modules'")
    # Like the SDK, the module folder's first module is the one this folder runs.
    module_id, config = next(iter(modules.items()))
    settings = ModuleSettings(module_id, module_dir, config)

    if not settings.get("LaunchSettings", "FilePath"):
        raise SettingsError(f"Module {module_id}: LaunchSettings.FilePath (the script to run) is missing")
    if not settings.start_file.is_file():
        raise SettingsError(f"Module {module_id}: its start file {settings.start_file} does not exist")
    if not settings.route_maps:
        raise SettingsError(f"Module {module_id}: RouteMaps is empty, so no client could reach it")
    return settings


def expand_option(value: str, macros: Mapping[str, str], host: HostPlatform) -> str:
    """A settings value as the module sees it: `@` means verbatim, else %MACROS% expand and slashes
    are turned the platform's way (except in URLs)."""
    if value.startswith("@"):
        return value[1:]
    for name, replacement in macros.items():
        value = value.replace(f"%{name}%", replacement)
    if "://" not in value:
        separator = "\\" if host.os_name == "windows" else "/"
        value = value.replace("/", separator).replace("\\", separator)
    return value


def _dotnet_bool(flag: bool) -> str:
    return "True" if flag else "False"


def module_environment(
    settings: ModuleSettings,
    *,
    port: int,
    python: str,
    data_dir: Path,
    base_env: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    host: HostPlatform | None = None,
) -> dict[str, str]:
    """The environment of the module process: `base_env` (the server's own, inherited) plus what the
    real server sets, then `overrides` (the command line's --env and --model) on top of everything."""
    host = host or HostPlatform.detect()
    macros = {
        "ROOT_PATH": str(data_dir),
        "DATA_DIR": str(data_dir),
        "MODULES_PATH": str(settings.module_dir.parent),
        "CURRENT_MODULE_PATH": str(settings.module_dir),
        "PLATFORM": host.platform_name,
        "OS": host.os_name,
        "PYTHON_PATH": python,
    }
    declared = {"CPAI_PORT": str(port), "CPAI_APPROOTPATH": "%ROOT_PATH%"}
    declared.update(
        {key.upper(): "" if value is None else str(value) for key, value in settings.environment_variables.items()}
    )

    env = dict(base_env)
    env.update({key: expand_option(value, macros, host) for key, value in declared.items()})
    server_defaults = {
        "CPAI_MODULE_SERVER_LAUNCHED": "true",
        "CPAI_MODULE_ID": settings.module_id,
        "CPAI_MODULE_NAME": settings.name,
        "CPAI_MODULE_PATH": str(settings.module_dir),
        "CPAI_MODULE_QUEUENAME": settings.queue,
        "CPAI_LOG_VERBOSITY": settings.log_verbosity,
        "CPAI_MODULE_PARALLELISM": str(settings.parallelism),
        "CPAI_MODULE_ENABLE_GPU": _dotnet_bool(settings.enable_gpu),
        # Not set by the real server: without it a Python module's prints reach the log only in blocks.
        "PYTHONUNBUFFERED": base_env.get("PYTHONUNBUFFERED", "1"),
    }
    required_mb = int(settings.get("LaunchSettings", "RequiredMb", default=0) or 0)
    if required_mb > 0:
        server_defaults["CPAI_MODULE_REQUIRED_MB"] = str(required_mb)
    device_name = settings.get("GpuOptions", "AcceleratorDeviceName")
    if device_name:
        server_defaults["CPAI_ACCEL_DEVICE_NAME"] = str(device_name)
    server_defaults["CPAI_HALF_PRECISION"] = str(settings.get("GpuOptions", "HalfPrecision", default="enable"))
    for key, value in server_defaults.items():
        if key not in declared:
            env[key] = value
    env.update(overrides or {})
    return env
