"""python -m bench.package_install: how long the package takes to install where nothing is set up yet.

Builds LlamaChat-<version>.zip with package_module.py, unzips it into an empty folder, runs `bash install.sh --small`
there (a fresh venv; pip takes the packages from PyPI, and llama-cpp-python from pip's wheel cache when that holds a
build of it, else compiles it: the results say which), then the self-test as the server's setup runs it. Nothing
reaches Hugging Face: HF_ENDPOINT is a closed loopback port. Writes package_install.json and package_install.md.

tests/test_package.py is the fast check of the same steps, on the project's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from llamachat_server.settings import load_module_settings
from package_module import write_package
from tests.live_server import ROOT

from . import machine

HOW_LLAMA_CPP_CAME = (  # pip's words in the install's output, first match wins
    ("Using cached llama_cpp_python", "a wheel from pip's cache"),
    ("Building wheel for llama-cpp-python", "compiled from source"),
    ("Downloading llama_cpp_python", "a downloaded wheel"),
)


def run(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    log.write_text(done.stdout + done.stderr, encoding="utf-8")
    return done


def measure(scratch: Path, use_pip_cache: bool) -> dict[str, Any]:
    settings = load_module_settings(ROOT)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "CPAI_", "LLAMACHAT_"))}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    if not use_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    module_dir = scratch / settings.module_id
    phases: dict[str, Any] = {}
    results: dict[str, Any] = {"phases": phases, "pip_cache": use_pip_cache}

    with machine.phase(phases, "package"):
        package = write_package(settings.module_id, settings.version, scratch)
    results["package"] = {"name": package.name, "megabytes": round(package.stat().st_size / 1e6, 2)}
    with machine.phase(phases, "unzip"):
        with zipfile.ZipFile(package) as archive:
            archive.extractall(module_dir)
    with machine.phase(phases, "install"):
        install = run(["bash", "install.sh", "--small"], module_dir, env, scratch / "install.log")
    results["install_ok"] = install.returncode == 0
    output = install.stdout + install.stderr
    results["llama_cpp_python"] = next((how for words, how in HOW_LLAMA_CPP_CAME if words in output), "not seen")
    if results["install_ok"]:
        with machine.phase(phases, "selftest"):
            selftest = run(
                [str(module_dir / ".venv" / "bin" / "python"), "llama_chat_adapter.py", "--selftest"],
                module_dir,
                env,
                scratch / "selftest.log",
            )
        results["selftest_ok"] = selftest.returncode == 0
        results["selftest"] = next((line for line in selftest.stdout.splitlines() if "Self-test" in line), "")
    else:
        results["install_tail"] = output[-3000:]
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Installing the package in an empty folder: {results['started_utc']}, "
        f"commit {results.get('commit', 'not recorded')}",
        "",
        f"{results['package']['name']} ({results['package']['megabytes']} MB), `bash install.sh --small` with a "
        f"fresh venv, pip's cache {'on' if results['pip_cache'] else 'off'}: llama-cpp-python came as "
        f"{results['llama_cpp_python']}. Machine: {results['machine']['cpu']}, {results['machine']['logical_cpus']} "
        f"CPUs; 1-minute load at the start {results['load']['load_1min']}.",
        "",
        "| step | seconds | load before / after | other processes (cores) |",
        "|---|---|---|---|",
    ]
    for name, phase in results["phases"].items():
        lines.append(
            f"| {name} | {phase['seconds']} | {phase['load_before']} / {phase['load_after']} | "
            f"{phase['other_processes_cores']} |"
        )
    lines += ["", f"Install {'succeeded' if results['install_ok'] else 'FAILED'}."]
    if "selftest" in results:
        lines.append(f"Self-test {'passed' if results['selftest_ok'] else 'FAILED'}: `{results['selftest']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.package_install", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the results go")
    parser.add_argument("--no-pip-cache", action="store_true", help="as on a first install: pip compiles llama.cpp")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        **machine.provenance(),
        "load": machine.wait_until_idle(args.wait_idle),
    }
    with tempfile.TemporaryDirectory(prefix="llamachat-package-") as scratch:
        results.update(measure(Path(scratch), use_pip_cache=not args.no_pip_cache))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "package_install.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "package_install.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    return 0 if results["install_ok"] and results.get("selftest_ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
