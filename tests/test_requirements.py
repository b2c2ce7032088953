"""The requirements files declare every package the code imports, in a form the real server's setup can install."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from conftest import ROOT

# What each group of files may import: its own requirements file and those it builds on.
GROUPS = {
    "the module and the standalone server": (["*.py", "llamachat_server/*.py"], ["requirements.txt"]),
    "the tests": (["tests/*.py"], ["requirements.txt", "tests/requirements.txt", "bench/requirements.txt"]),
    "the benchmark": (["bench/*.py"], ["requirements.txt", "bench/requirements.txt"]),
}
OUR_OWN = {path.stem for pattern in ("*.py", "tests/*.py", "bench/*.py") for path in ROOT.glob(pattern)} | {
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


def test_module_requirements_survive_the_server_setup_shell():
    # The real setup evals each line in a shell: `pkg>=1,<2` would install bare pkg and write files named =1 and 2.
    for line in package_lines(ROOT / "requirements.txt"):
        assert "<" not in line and ">" not in line, f"{line!r}: write bounds with ~= instead"
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[a-z0-9,_-]+\])?(~=[0-9][0-9.]*|==[0-9][0-9.*]*)?", line), (
            f"{line!r} is not a plain requirement"
        )
