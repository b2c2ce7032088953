"""The requirements files declare every package the code imports, in a form the real server's setup can install, and
the server's setup picks the right one for each machine.

What setup does is written here from reading the CodeProject.AI Server's scripts (public repository
codeproject/CodeProject.AI-Server, commit e3468c831b169e27ed6c97f665f1efb48ab0285f; SSPL, so described, not copied):
src/scripts/utils.sh lines 1867-1970 (Linux/macOS) and src/scripts/utils.bat lines 860-990 (Windows) choose the file,
utils.sh lines 2010-2080 and utils.bat lines 1230-1290 install it line by line.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from live_server import ROOT

# Every file the server's setup may pick: it looks in the module folder only (utils.sh 1869-1870). tests/ and bench/
# requirements are for tests/run.sh, which installs them with pip -r.
SETUP_FILES = sorted(ROOT.glob("requirements*.txt"))
WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl/"
CUDA_BUILD = "--config-settings=cmake.args=-DGGML_CUDA=on"

# What each group of files may import: its own requirements file and those it builds on.
GROUPS = {
    "the module and the standalone server": (["*.py", "llamachat/*.py", "llamachat_server/*.py"], ["requirements.txt"]),
    "the tests": (["tests/*.py"], ["requirements.txt", "tests/requirements.txt", "bench/requirements.txt"]),
    "the benchmark": (["bench/*.py"], ["requirements.txt", "bench/requirements.txt"]),
}
OUR_OWN = {path.stem for pattern in ("*.py", "tests/*.py", "bench/*.py") for path in ROOT.glob(pattern)} | {
    "llamachat",
    "llamachat_server",
    "tests",
    "bench",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_lines(requirements: Path) -> list[str]:
    lines = (line.split(" #")[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def declared(requirements: list[str]) -> set[str]:
    return {normalise(_NAME.match(line).group()) for name in requirements for line in package_lines(ROOT / name)}


def imported_packages(patterns: list[str]) -> dict[str, str]:
    """Distribution → the first file that imports it, for every import outside the standard library and this repo."""
    distributions = packages_distributions()
    found: dict[str, str] = {}
    for path in sorted(p for pattern in patterns for p in ROOT.glob(pattern)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (name.split(".")[0] for name in names):
                if top in sys.stdlib_module_names or top in OUR_OWN or top == "__future__":
                    continue
                assert top in distributions, f"{path.relative_to(ROOT)} imports {top}, which is not installed"
                for distribution in distributions[top]:
                    found.setdefault(normalise(distribution), str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("group", GROUPS)
def test_every_imported_package_is_declared(group):
    patterns, requirements = GROUPS[group]
    missing = {
        package: where
        for package, where in imported_packages(patterns).items()
        if package not in declared(requirements)
    }
    assert not missing, f"{group} import packages that {', '.join(requirements)} do not declare: {missing}"


# --- installed by the server's setup, one line at a time -------------------------------------------------------------

# Setup's loop over a requirements file on Linux and macOS, as utils.sh runs it: blank and comment lines end the
# current options, a line starting with '-' adds to them, any other line is a package whose text after '#' is the
# description; the package goes through eval together with the options collected so far. The interpreter is
# ARGV_RECORDER, which writes down the arguments it gets instead of installing anything.
SETUP_LINE_LOOP = r"""
requirements="$1"; venvPythonCmdPath="$2"; packagesDirPath="$3"; record="$4"; pipFlags=""
currentOption=''
IFS=$'\n'
cat "$requirements" | while read -r line || [ -n "$line" ]; do
    line="$(echo $line | tr -d '\r\n')"
    if [ "$line" = "" ] || [ "${line:0:1}" = "#" ]; then
        currentOption=''
    elif [ "${line:0:1}" = "-" ]; then
        currentOption="${currentOption} ${line}"
    else
        package_name="$line"; description=''
        IFS='#'; tokens=($package_name); IFS=$'\n'
        if [ ${#tokens[*]} -gt 1 ]; then package_name="${tokens[0]}"; description="${tokens[1]}"; fi
        package_name="${package_name#"${package_name%%[![:space:]]*}"}"
        package_name="${package_name%"${package_name##*[![:space:]]}"}"
        module_name=$(echo "$package_name" | sed 's/[<=>,~].*//g'); module_name=${module_name%%[*}
        echo "package|${description}|${module_name}" >> "$record"
        package_name="${package_name/</\\<}"
        eval "\${venvPythonCmdPath}" -m pip install "${package_name}" --target "\${packagesDirPath}" \
            ${currentOption} ${pipFlags}
    fi
done
"""
ARGV_RECORDER = """import json, sys
with open(sys.argv[0] + ".record", "a") as record:
    record.write("argv|" + json.dumps(sys.argv[1:]) + "\\n")
"""


def run_setup_line_loop(requirements: Path, scratch: Path) -> tuple[list[dict], list[str]]:
    """Each package line as setup's loop hands it to pip: description, the name it checks with `pip show`, the
    arguments pip gets; and the files the eval left in the working folder (redirections write them there)."""
    recorder = scratch / "python"
    recorder.write_text(f"#!{sys.executable}\n{ARGV_RECORDER}")
    recorder.chmod(0o755)
    record = Path(f"{recorder}.record")
    workdir = scratch / "cwd"
    workdir.mkdir()
    args = [str(requirements), str(recorder), str(scratch / "site-packages"), str(record)]
    subprocess.run(["bash", "-c", SETUP_LINE_LOOP, "setup", *args], cwd=workdir, check=True, timeout=60)
    packages: list[dict] = []
    for entry in record.read_text().splitlines() if record.exists() else []:
        kind, _, rest = entry.partition("|")
        if kind == "package":
            description, module_name = rest.split("|")
            packages.append({"description": description.strip(), "module_name": module_name})
        else:
            packages[-1]["argv"] = json.loads(rest)
    return packages, sorted(p.name for p in workdir.iterdir())


def package_specs(requirements: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def option_lines(requirements: Path) -> list[str]:
    return [line.strip() for line in requirements.read_text().splitlines() if line.startswith("-")]


@pytest.mark.parametrize("requirements", SETUP_FILES, ids=lambda path: path.name)
def test_every_line_reaches_pip_whole_through_the_setup_eval(requirements, tmp_path):
    packages, left_behind = run_setup_line_loop(requirements, tmp_path)

    assert left_behind == [], f"the eval wrote files {left_behind}: a < or > in {requirements.name}"
    specs = package_specs(requirements)
    assert [p["argv"][3] for p in packages] == specs  # pip got each whole specifier, bounds included
    for package in packages:
        spec = package["argv"][3]
        assert package["argv"][:3] == ["-m", "pip", "install"]
        assert package["argv"][4:6] == [
            "--target",
            str(tmp_path / "site-packages"),
        ]
        assert package["description"].startswith("Installing "), f"{spec}: give it a '# Installing ...' comment"
        assert normalise(package["module_name"]) == normalise(_NAME.match(spec).group())  # what `pip show` checks
        # setup.bat passes the package in quotes, as one argument: a space would make it an invalid requirement.
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(~=[0-9][0-9.]*|==[0-9][0-9.*]*)?", spec), spec
    # The option lines reach llama-cpp-python, the last package, and no other package.
    options = {p["argv"][3]: p["argv"][6:] for p in packages}
    assert options.pop(specs[-1]) == " ".join(option_lines(requirements)).split()
    assert specs[-1].startswith("llama-cpp-python~=")
    assert all(rest == [] for rest in options.values()), options


def test_the_setup_line_loop_reproduction_catches_what_broke_the_original(tmp_path):
    # The check above can fail: a range with < and > loses its bounds in the eval and leaves files behind.
    broken = tmp_path / "requirements.txt"
    broken.write_text("# a comment\n--extra-index-url https://example.invalid/simple\nllama-cpp-python>=0.3.36,<0.4\n")
    packages, left_behind = run_setup_line_loop(broken, tmp_path)
    assert packages[0]["argv"][3] == "llama-cpp-python"  # no bounds: a future 0.4 would be installed
    assert left_behind == ["=0.3.36,<0.4"]  # the stray file the original's setup left in the venv folder
    assert packages[0]["argv"][-2:] == ["--extra-index-url", "https://example.invalid/simple"]


def test_all_setup_files_hold_the_same_packages_and_differ_only_in_how_llama_cpp_is_built():
    # Setup installs exactly one file, so each repeats requirements.txt's packages.
    base = package_specs(ROOT / "requirements.txt")
    for requirements in SETUP_FILES:
        assert package_specs(requirements) == base, requirements.name


def test_pip_reads_every_setup_file_and_the_installed_packages_satisfy_it():
    # pip -r (install.sh on its own) takes the option lines too; it ignores a --config-settings line without a package.
    args = [arg for requirements in SETUP_FILES for arg in ("-r", str(requirements))]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PIP_CONFIG_FILE": "/dev/null", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install" not in result.stdout, result.stdout


# --- which file setup picks -------------------------------------------------------------------------------------------


def setup_picks(present: set[str], os_name: str, arch: str, cuda: str = "", install_gpu: bool = True) -> str:
    """The requirements file the server's setup installs, among the `present` file names.

    os_name and arch as setup names them: linux|macos|windows, x86_64|arm64. cuda: the version setup reads from nvcc or
    nvidia-smi ("12.4"), "" without CUDA. utils.sh 1897-1970: CUDA files (setup never looks on macOS, 565-571), then
    ROCm (not in our cases), then MPS on macOS arm64 (setup.sh 945-946), then GPU, then the CPU files. Its second CUDA
    test looks for requirements.<os>.<arch>.cuda<major>.cuda.txt and would then install a file without the extra
    ".cuda": a file named requirements.<os>.<arch>.cuda<major>.txt is never picked. utils.bat 904-986 does the same
    for Windows (hasCUDA from nvidia-smi), without that slip, and retries the bare .cuda names without a version.
    """
    major, major_minor = cuda.split(".")[0], cuda.replace(".", "_")
    candidates: list[tuple[str, str]] = []  # (the name setup tests for, the name it then installs)
    if install_gpu and cuda and os_name != "macos":
        typo = ".cuda" if os_name != "windows" else ""
        candidates += [
            (f"{os_name}.{arch}.cuda{major_minor}", f"{os_name}.{arch}.cuda{major_minor}"),
            (f"{os_name}.{arch}.cuda{major}{typo}", f"{os_name}.{arch}.cuda{major}"),
            (f"{os_name}.{arch}.cuda", f"{os_name}.{arch}.cuda"),
        ]
        candidates += [
            (stem, stem) for stem in (f"{os_name}.cuda{major_minor}", f"{os_name}.cuda{major}", f"{os_name}.cuda")
        ]
        candidates += [(stem, stem) for stem in (f"cuda{major_minor}", f"cuda{major}", "cuda")]
    if install_gpu and os_name == "macos" and arch == "arm64":
        candidates.append(("mps", "mps"))
    if install_gpu:
        candidates += [(stem, stem) for stem in (f"{os_name}.{arch}.gpu", f"{os_name}.gpu", "gpu")]
    candidates += [(stem, stem) for stem in (f"{os_name}.{arch}", os_name)]
    names = [(f"requirements.{tested}.txt", f"requirements.{used}.txt") for tested, used in candidates]
    return next((used for tested, used in names if tested in present), "requirements.txt")


OURS = {path.name for path in SETUP_FILES}
# (os, arch, CUDA version, InstallGPU) → the file setup must install, its wheel index, whether a source build is CUDA.
PLATFORMS = [
    (("linux", "x86_64", "12.4", True), "requirements.linux.cuda12.txt", "cu121", True),
    (("linux", "x86_64", "12.0", True), "requirements.linux.cuda12.txt", "cu121", True),
    (("linux", "arm64", "12.6", True), "requirements.linux.cuda12.txt", "cu121", True),  # no wheel: CUDA source build
    (("linux", "x86_64", "11.8", True), "requirements.linux.cuda11.txt", "cu118", True),
    (("linux", "x86_64", "11.4", True), "requirements.linux.cuda11.txt", "cu118", True),
    (("linux", "x86_64", "13.0", True), "requirements.linux.cuda13.txt", "cu130", True),
    (("linux", "x86_64", "10.2", True), "requirements.txt", "cpu", False),  # no llama.cpp wheel for CUDA 10
    (("linux", "x86_64", "12.4", False), "requirements.txt", "cpu", False),  # InstallGPU false: CPU only
    (("linux", "x86_64", "", True), "requirements.txt", "cpu", False),
    (("linux", "arm64", "", True), "requirements.txt", "cpu", False),
    (("windows", "x86_64", "12.6", True), "requirements.windows.cuda12.txt", "cu124", True),
    (("windows", "x86_64", "11.8", True), "requirements.windows.cuda11.txt", "cu118", True),
    (("windows", "x86_64", "13.0", True), "requirements.windows.cuda13.txt", "cu130", True),
    (("windows", "x86_64", "", True), "requirements.txt", "cpu", False),
    (("macos", "arm64", "", True), "requirements.macos.arm64.txt", "metal", False),  # Metal: the default build there
    (("macos", "arm64", "", False), "requirements.macos.arm64.txt", "metal", False),
    (("macos", "x86_64", "", True), "requirements.txt", "cpu", False),
]


@pytest.mark.parametrize(
    "machine, picked, index, cuda_build", PLATFORMS, ids=["-".join(map(str, machine)) for machine, *_ in PLATFORMS]
)
def test_setup_picks_the_file_for_the_machine_and_it_installs_the_right_llama_cpp(machine, picked, index, cuda_build):
    assert setup_picks(OURS, *machine) == picked
    options = option_lines(ROOT / picked)
    assert f"--extra-index-url {WHEEL_INDEX}{index}" in options
    assert "--prefer-binary" in options  # an older prebuilt wheel rather than compiling a newer release
    assert (CUDA_BUILD in options) == cuda_build  # without a wheel, pip compiles the source, with CUDA where asked


def test_the_selection_reproduction_has_setups_typo():
    # A file named for <os>.<arch>.cuda<major> would never be picked; ours avoid that form.
    assert setup_picks({"requirements.linux.x86_64.cuda12.txt", "requirements.txt"}, "linux", "x86_64", "12.4") == (
        "requirements.txt"
    )
    assert not [name for name in OURS if re.fullmatch(r"requirements\.linux\.[a-z0-9_]+\.cuda\d+\.txt", name)]
    assert setup_picks(OURS | {"requirements.linux.x86_64.cuda12_4.txt"}, "linux", "x86_64", "12.4") == (
        "requirements.linux.x86_64.cuda12_4.txt"
    )


def test_every_file_we_ship_is_one_setup_can_pick():
    reachable = {setup_picks(OURS, *machine) for machine, *_ in PLATFORMS}
    assert reachable == OURS
