"""Packs the module's runtime files into <ModuleId>-<Version>.zip, the package CodeProject.AI Server installs.

    python package_module.py <ModuleId> <Version> [--dest DIR]

package.sh and package.bat call it, as the server's devops/build/create_packages scripts call those: from the module
folder, with the module id and version, expecting the zip in the module folder. Python's zipfile writes it (GNU tar's
`tar -caf x.zip` writes a tar whatever the name).

What ships is what the module needs to install and run, in or out of the server: its Python files (the engine in
llamachat/, and the standalone server llamachat_server/: llamachat/llama_settings.py reads modulesettings.json with
its settings.py, and it is how the module runs without CodeProject.AI), the settings (not *.development.*, which are
a developer's), the requirements, the install scripts, the Explorer page and the licence. Not the tests, benchmarks,
docs, models or virtual environments.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from llamachat.model_file import PARTIAL_SUFFIX

MODULE_DIR = Path(__file__).resolve().parent
RUNTIME_PATTERNS = (
    "*.py",
    "modulesettings*.json",
    "requirements*.txt",
    "install.sh",
    "install.bat",
    "explore.html",
    "LICENSE",  # MIT: the notice goes with every copy
)
RUNTIME_FOLDERS = ("llamachat", "llamachat_server")
NOT_SHIPPED = {Path(__file__).name}  # the packager itself


def _shipped(path: Path) -> bool:
    return ".development." not in path.name and path.suffix != ".pyc" and "__pycache__" not in path.parts


def runtime_files(module_dir: Path = MODULE_DIR) -> list[Path]:
    """The files the package holds, relative to the module folder, sorted."""
    found = {path for pattern in RUNTIME_PATTERNS for path in module_dir.glob(pattern) if path.is_file()}
    for folder in RUNTIME_FOLDERS:
        found.update(path for path in (module_dir / folder).rglob("*") if path.is_file())
    return sorted(
        path.relative_to(module_dir)
        for path in found
        if _shipped(path.relative_to(module_dir)) and path.name not in NOT_SHIPPED
    )


def write_package(module_id: str, version: str, dest: Path, module_dir: Path = MODULE_DIR) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    package = dest / f"{module_id}-{version}.zip"
    partial = package.with_name(package.name + PARTIAL_SUFFIX)  # the caller moves <id>-<version>.zip: only a whole one
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in runtime_files(module_dir):
            archive.write(module_dir / name, name.as_posix())  # keeps the mode bits: install.sh stays executable
    partial.replace(package)
    return package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack the module's runtime files into <ModuleId>-<Version>.zip.")
    parser.add_argument("module_id", help="the module id, the first key under Modules in modulesettings.json")
    parser.add_argument("version", help="the module version, e.g. 2.0.0")
    parser.add_argument("--dest", type=Path, default=MODULE_DIR, help="where to write the zip (the module folder)")
    args = parser.parse_args(argv)
    for value in (args.module_id, args.version):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            parser.error(f"{value!r} cannot be part of a file name: use letters, digits, '.', '_' and '-'")
    package = write_package(args.module_id, args.version, args.dest)
    print(f"Packaged {len(runtime_files())} files into {package} ({package.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
