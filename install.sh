#!/usr/bin/env bash
# Installs LlamaChat on Linux and macOS. Two ways in:
#
#   bash install.sh [--small] [--cpu]
#       On its own: makes the virtual environment .venv in the module folder (python3.11, else python3 >= 3.11),
#       installs the requirements file for this machine into it (the one the server's setup would pick: with CUDA
#       when nvidia-smi reports an NVIDIA GPU, unless --cpu; with Metal on Apple silicon; else requirements.txt),
#       then gets the model with fetch_model.py.
#   source install.sh install
#       From the CodeProject.AI server's setup, which has made the venv (venvPythonCmdPath) and installs the
#       requirements file it picks itself afterwards: only gets the model, keeping a copy in the server's download
#       cache (and, where setup found a CUDA toolkit but there is no GPU, installs the CPU build first), and reports a
#       failure in moduleInstallErrors.
#
# Re-running skips what is already there. --small, or LLAMACHAT_MODEL=small in the environment, installs the
# small SmolLM2-135M model rather than the default one (which fetch_model.py also falls back to when the
# Hugging Face Hub cannot be reached).
#
# Sourced, this script shares the server's shell: everything runs in functions with local variables, without
# `set -e`, `cd` or `exit`, and the functions are removed again at the end.

llamachat_say() {
    echo "LlamaChat install: $*"
}

llamachat_apt_install() {
    # Only as root: sudo would stop an unattended install to ask for a password.
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        return 1
    fi
    llamachat_say "installing with apt-get: $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

llamachat_find_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    llamachat_say "ERROR: no Python 3.11 (nor python3 >= 3.11) found. Install it, e.g. on Debian/Ubuntu:" >&2
    llamachat_say "  apt-get install python3.11 python3.11-venv" >&2
    return 1
}

llamachat_make_venv() {
    local venv="$1" python version
    python="$(llamachat_find_python)" || return 1
    version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    llamachat_say "creating the virtual environment $venv with $python ($version)"
    "$python" -m venv "$venv" && return 0
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a separate package.
    rm -rf "$venv"
    if llamachat_apt_install "python${version}-venv" && "$python" -m venv "$venv"; then
        return 0
    fi
    rm -rf "$venv"
    llamachat_say "ERROR: could not create $venv. On Debian/Ubuntu install python${version}-venv (or python3-venv)" \
        "as root: apt-get install python${version}-venv" >&2
    return 1
}

llamachat_ensure_build_tools() {
    # Only for compiling llama-cpp-python from PyPI's source, when no prebuilt wheel can be had.
    local tool missing=""
    for tool in gcc g++ cmake; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    [ -z "$missing" ] && return 0
    llamachat_say "compiling llama-cpp-python needs:$missing"
    if llamachat_apt_install build-essential cmake; then
        return 0
    fi
    llamachat_say "ERROR: missing$missing. Install them, then run this script again:" >&2
    llamachat_say "  Debian/Ubuntu (as root): apt-get install build-essential cmake python3-venv" >&2
    llamachat_say "  macOS: xcode-select --install && brew install cmake" >&2
    return 1
}

llamachat_choose_requirements() {
    # Sets `requirements` (a file name in $1) and `backend` for this machine, as the server's setup chooses with
    # GpuOptions.InstallGPU (tests/test_requirements.py); $2 non-empty forces the CPU build.
    local module_dir="$1" force_cpu="$2" cuda="" major
    requirements="requirements.txt"
    backend="CPU"
    if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
        requirements="requirements.macos.arm64.txt"
        backend="Metal"
        llamachat_say "Apple silicon: installing $requirements (llama.cpp with Metal)"
        return 0
    fi
    if [ -n "$force_cpu" ]; then
        llamachat_say "--cpu: installing $requirements (llama.cpp for the CPU only)"
        return 0
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        llamachat_say "no NVIDIA GPU (no nvidia-smi): installing $requirements (llama.cpp for the CPU only)"
        return 0
    fi
    cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)"
    major="${cuda%%.*}"
    if [ -n "$major" ] && [ -f "$module_dir/requirements.linux.cuda$major.txt" ]; then
        requirements="requirements.linux.cuda$major.txt"
        backend="CUDA"
        llamachat_say "NVIDIA GPU with CUDA $cuda (nvidia-smi): installing $requirements (llama.cpp with CUDA;" \
            "--cpu installs the CPU build instead)"
    else
        llamachat_say "nvidia-smi reports ${cuda:+CUDA $cuda, }no CUDA version LlamaChat has a llama.cpp build for" \
            "(11, 12, 13): installing $requirements (llama.cpp for the CPU only)"
    fi
}

llamachat_index_reachable() {
    # Prints why not when the wheel index $2 cannot be reached within 5 seconds (pip would wait and retry far longer).
    "$1" - "$2" <<'PYTHON'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/llama-cpp-python/", timeout=5).close()
except Exception as ex:  # any failure means: no wheels from there
    print(getattr(ex, "reason", None) or ex)
    sys.exit(1)
PYTHON
}

llamachat_install_requirements() {
    # pip-installs requirements file $3 of module folder $2 into the venv of Python $1; $4 = the backend it builds.
    # llama-cpp-python comes as a prebuilt wheel from the index the file names (LLAMACHAT_WHEEL_INDEX overrides it;
    # "none" compiles for this CPU) when that index can be reached, else pip compiles PyPI's source release.
    local python="$1" module_dir="$2" file="$2/$3" backend="$4" index why filtered status
    local -a index_args=()
    if "$python" -c 'import llama_cpp' 2>/dev/null; then
        llamachat_say "checking $3 (llama-cpp-python is installed already)"
        if [ "$backend" != CPU ] \
            && ! "$python" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null
        then
            llamachat_say "the installed llama-cpp-python is a CPU-only build, so LlamaChat will not use the GPU:" \
                "delete $(dirname "$(dirname "$python")") and run this script again to get the $backend build"
        fi
    else
        index="${LLAMACHAT_WHEEL_INDEX:-$(sed -n 's/^--extra-index-url[[:space:]]*//p' "$file" | head -n 1)}"
        if [ "$index" = none ]; then
            llamachat_say "LLAMACHAT_WHEEL_INDEX=none: installing $3 with llama-cpp-python compiled from PyPI's" \
                "source for this machine's CPU (about 5 minutes on 2 cores)"
            llamachat_ensure_build_tools || return 1
        elif why="$(llamachat_index_reachable "$python" "$index")"; then
            index_args=(--extra-index-url "$index")
            llamachat_say "installing $3: llama-cpp-python as a prebuilt $backend wheel from $index (pip compiles" \
                "PyPI's source instead only if that index has no wheel for this platform)"
        else
            llamachat_say "$index cannot be reached ($why): installing $3 with llama-cpp-python compiled from" \
                "PyPI's source (about 5 minutes on 2 cores; pip's cache keeps the built wheel for the next install)"
            llamachat_ensure_build_tools || return 1
        fi
    fi
    # pip -r ignores the --config-settings line that asks setup's pip for a CUDA build: CMAKE_ARGS says it here.
    filtered="$(mktemp)" || return 1
    grep -v '^--extra-index-url' "$file" >"$filtered"
    if [ "$backend" = CUDA ]; then
        CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" "$python" -m pip install --disable-pip-version-check \
            "${index_args[@]}" -r "$filtered"
    else
        "$python" -m pip install --disable-pip-version-check "${index_args[@]}" -r "$filtered"
    fi
    status=$?
    rm -f "$filtered"
    return "$status"
}

llamachat_fetch_model() {
    # Runs fetch_model.py with the module's Python; its exit code 3 means the small model replaced the default.
    local python="$1" status
    shift
    "$python" "$@"
    status=$?
    case "$status" in
        0) return 0 ;;
        3) llamachat_say "the Hugging Face Hub could not be reached: LlamaChat will chat with the small" \
               "SmolLM2-135M model until the install is run again with the Hub in reach."
           return 0 ;;
        *) return "$status" ;;
    esac
}

llamachat_standalone_install() {
    local module_dir venv python small="" cpu="" arg requirements backend
    for arg in "$@"; do
        case "$arg" in
            --small) small="--small" ;;
            --cpu) cpu="--cpu" ;;
            -h|--help)
                echo "Usage: bash install.sh [--small] [--cpu]   (LLAMACHAT_MODEL=small works like --small)"
                return 0 ;;
            *)
                llamachat_say "ERROR: unknown option '$arg'. Usage: bash install.sh [--small] [--cpu]" >&2
                return 2 ;;
        esac
    done
    module_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    venv="$module_dir/.venv"
    python="$venv/bin/python"

    if [ -x "$python" ] && "$python" -c 'import sys' 2>/dev/null; then
        llamachat_say "using the existing virtual environment $venv"
    elif [ -e "$venv" ]; then
        llamachat_say "ERROR: $venv exists but its Python does not run; delete it and run this script again." >&2
        return 1
    else
        llamachat_make_venv "$venv" || return 1
    fi

    llamachat_choose_requirements "$module_dir" "$cpu"
    if ! llamachat_install_requirements "$python" "$module_dir" "$requirements" "$backend"; then
        llamachat_say "ERROR: pip could not install $requirements (see its messages above)." >&2
        return 1
    fi

    if ! llamachat_fetch_model "$python" "$module_dir/fetch_model.py" $small; then
        llamachat_say "ERROR: no model could be installed (see the messages above)." >&2
        return 1
    fi
    llamachat_say "done. Python environment: $venv; models: $module_dir/models"
}

llamachat_cpu_build_without_gpu() {
    # Setup picks the CUDA requirements file whenever it finds a CUDA toolkit (nvcc), GPU or not. Without a GPU that
    # build would never be used, and where no prebuilt wheel can be had it is compiled, or fails to compile (as on a
    # machine with nvcc but no GPU to choose the CUDA architectures for). Installing the CPU build now makes setup's
    # own step skip llama-cpp-python, which it finds installed.
    [ "${installGPU:-}" = true ] && [ "${hasCUDA:-}" = true ] || return 0
    nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && return 0
    llamachat_say "setup found CUDA ${cuda_version:-} but nvidia-smi lists no NVIDIA GPU: installing llama.cpp for the" \
        "CPU now, in place of the CUDA build setup would pick (set GpuOptions.InstallGPU to false to skip this check)"
    llamachat_install_requirements "$1" "$2" requirements.txt CPU
}

llamachat_server_install() {
    local python="${venvPythonCmdPath:-}" module_dir="${moduleDirPath:-}" package requirement cache_dir="" quiet=""
    if [ -z "$python" ] || [ -z "$module_dir" ]; then
        moduleInstallErrors="install.sh install is for the CodeProject.AI server's setup (moduleDirPath and venvPythonCmdPath are not set); run 'bash install.sh' on its own instead"
        llamachat_say "ERROR: $moduleInstallErrors" >&2
        return 1
    fi
    [ "${verbosity:-}" = "quiet" ] && quiet=1
    if ! llamachat_cpu_build_without_gpu "$python" "$module_dir"; then
        moduleInstallErrors="Unable to install llama-cpp-python for the CPU (see the messages above)"
        llamachat_say "ERROR: $moduleInstallErrors" >&2
        return 1
    fi

    # The server installs requirements.txt only after this script, but fetch_model.py needs two of its packages now:
    # huggingface_hub downloads the model, commentjson reads modulesettings.json as the server does.
    for package in huggingface_hub commentjson; do
        "$python" -c "import $package" 2>/dev/null && continue
        requirement="$(grep -i -m 1 "^${package//_/[-_]}" "$module_dir/requirements.txt" | sed "s/[[:space:]]*#.*//")"
        [ -n "$requirement" ] || requirement="$package"
        llamachat_say "installing $requirement to download the model"
        if ! "$python" -m pip install --disable-pip-version-check ${quiet:+--quiet} "$requirement"; then
            moduleInstallErrors="Unable to install $requirement, which the LlamaChat model download needs"
            llamachat_say "ERROR: $moduleInstallErrors" >&2
            return 1
        fi
    done

    # The server's download cache outlives the module folder, so a reinstall need not download 4 GB again.
    # One path for both keeping and looking up the model (docs/protocol.md §4.1, item 7).
    if [ -n "${downloadDirPath:-}" ]; then
        cache_dir="$downloadDirPath/${modulesDir:-modules}/${assetsDir:-assets}/${moduleDirName:-$(basename "$module_dir")}"
    fi
    # In a subshell, so that turning the progress bar off does not reach the server's shell.
    if ! ( [ -n "$quiet" ] && export HF_HUB_DISABLE_PROGRESS_BARS=1
           llamachat_fetch_model "$python" "$module_dir/fetch_model.py" ${cache_dir:+--cache-dir "$cache_dir"} ); then
        moduleInstallErrors="Unable to install the LlamaChat model (see the messages above)"
        llamachat_say "ERROR: $moduleInstallErrors" >&2
        return 1
    fi
}

llamachat_install() {
    local status
    if [ "${1:-}" = "install" ]; then
        llamachat_server_install
    else
        llamachat_standalone_install "$@"
    fi
    status=$?
    unset -f llamachat_say llamachat_apt_install llamachat_find_python llamachat_make_venv \
        llamachat_ensure_build_tools llamachat_choose_requirements llamachat_index_reachable \
        llamachat_install_requirements llamachat_cpu_build_without_gpu llamachat_fetch_model \
        llamachat_standalone_install llamachat_server_install llamachat_install
    return "$status"
}

# The last command's status is the script's: its exit code when run, its return code when sourced.
llamachat_install "$@"
