"""LlamaChat's own settings, the CPAI_MODULE_LLAMA_* environment variables, read and checked in one place.

modulesettings.json's EnvironmentVariables hold every default, so the module, fetch_model.py and the setup's
self-test (which runs with none of these variables set) all see the same values. The file is read with the
standalone server's code, per-OS layers included, and a default is treated as the real server treats it before
passing it on ('@' keeps a value verbatim, slashes turn the platform's way). An empty variable means its default,
as with the SDK's ModuleOptions.getEnvVariable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamachat_server.settings import HostPlatform, SettingsError, expand_option, load_module_settings

MODULE_DIR = Path(__file__).resolve().parent.parent  # the module folder, above this package
# The names of chat_template.TEMPLATES (tests/test_llama_settings.py keeps the two equal): chat_template imports
# llama_cpp, which fetch_model.py cannot rely on while the server's setup is still installing packages.
CHAT_FORMATS = ("chatml", "gemma", "phi3")
MAX_DRAFT_TOKENS = 32
# A Hugging Face repo id, "owner/name".
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class LlamaSettingsError(ValueError):
    """A setting that cannot be used; the message names the variable, what is wrong and what is allowed."""


@dataclass(frozen=True)
class LlamaSettings:
    model_dir: Path  # CPAI_MODULE_LLAMA_MODEL_DIR, made absolute: a relative one is relative to the module folder
    model_filename: str  # CPAI_MODULE_LLAMA_MODEL_FILENAME: the GGUF file in model_dir
    model_repo: str  # CPAI_MODULE_LLAMA_MODEL_REPO: the Hub repo it comes from, "owner/name"; "" = no download
    model_fileglob: str  # CPAI_MODULE_LLAMA_MODEL_FILEGLOB: which file of that repo the module downloads
    context_size: int  # CPAI_MODULE_LLAMA_CONTEXT_SIZE: tokens the model sees at once, history and reply included
    threads: int  # CPAI_MODULE_LLAMA_THREADS: CPU threads; 0 = chosen automatically
    gpu_layers: int  # CPAI_MODULE_LLAMA_GPU_LAYERS: layers offloaded to a GPU; -1 = all, 0 = none
    chat_format: str  # CPAI_MODULE_LLAMA_CHAT_FORMAT: one of CHAT_FORMATS; "" = the model's own template
    queue_size: int  # CPAI_MODULE_LLAMA_QUEUE_SIZE: chats that may wait while the model is busy (chat_queue.py)
    result_ttl: int  # CPAI_MODULE_LLAMA_RESULT_TTL: seconds a finished chat's result stays readable
    parallel: int  # CPAI_MODULE_LLAMA_PARALLEL: chats decoded together (batch_decoder.py); 1 = one at a time
    cache_ram_mb: int  # CPAI_MODULE_LLAMA_CACHE_RAM_MB: conversations' KV states kept in RAM; 0 = none
    cache_disk_gb: float  # CPAI_MODULE_LLAMA_CACHE_DISK_GB: ... kept on disk, in cache_dir; 0 = none
    cache_dir: Path  # CPAI_MODULE_LLAMA_CACHE_DIR, made absolute as model_dir is (conversation_cache.py)
    draft_tokens: int  # CPAI_MODULE_LLAMA_DRAFT_TOKENS: the most drafted per pass (prompt_lookup.py); 0 = none

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, module_dir: Path = MODULE_DIR, host: HostPlatform | None = None
    ) -> LlamaSettings:
        """The settings from `environ` (default: this process's environment), else modulesettings.json in
        `module_dir` as laid out for `host` (default: this machine). Raises LlamaSettingsError."""
        module_dir = Path(module_dir).resolve()
        host = host or HostPlatform.detect()
        try:
            declared = load_module_settings(module_dir, host).environment_variables
        except SettingsError as ex:
            raise LlamaSettingsError(str(ex)) from ex
        defaults = {name.upper(): "" if value is None else str(value) for name, value in declared.items()}
        environ = os.environ if environ is None else environ

        def value(name: str) -> str:
            given = environ.get(name, "")
            if given != "":
                return given.strip()
            if name not in defaults:
                raise LlamaSettingsError(
                    f"{name} is not set, and the EnvironmentVariables of "
                    f"{module_dir / 'modulesettings.json'} give it no default: add one there"
                )
            return expand_option(defaults[name], {}, host).strip()

        def whole_number(name: str, low: int, meaning: str) -> int:
            raw = value(name)
            try:
                number = int(raw)
            except ValueError:
                number = None
            if number is None or number < low:
                raise LlamaSettingsError(f"{name} must be a whole number of at least {low}, not {raw!r} ({meaning})")
            return number

        def decimal_number(name: str, meaning: str) -> float:
            raw = value(name)
            try:
                number = float(raw)
            except ValueError:
                number = None
            if number is None or not 0 <= number < float("inf"):
                raise LlamaSettingsError(f"{name} must be a number of at least 0, not {raw!r} ({meaning})")
            return number

        return cls(
            model_dir=_folder(
                "CPAI_MODULE_LLAMA_MODEL_DIR", value("CPAI_MODULE_LLAMA_MODEL_DIR"), module_dir, "the model", "./models"
            ),
            model_filename=_model_filename(value("CPAI_MODULE_LLAMA_MODEL_FILENAME")),
            model_repo=_model_repo(value("CPAI_MODULE_LLAMA_MODEL_REPO")),
            model_fileglob=_model_fileglob(value("CPAI_MODULE_LLAMA_MODEL_FILEGLOB")),
            context_size=whole_number(
                "CPAI_MODULE_LLAMA_CONTEXT_SIZE", 256, "the tokens the model sees at once, e.g. 4096"
            ),
            threads=whole_number(
                "CPAI_MODULE_LLAMA_THREADS", 0, "CPU threads for the model; 0 chooses them automatically"
            ),
            gpu_layers=whole_number(
                "CPAI_MODULE_LLAMA_GPU_LAYERS", -1, "model layers offloaded to a GPU; -1 = all, 0 = none"
            ),
            chat_format=_chat_format(value("CPAI_MODULE_LLAMA_CHAT_FORMAT")),
            queue_size=whole_number(
                "CPAI_MODULE_LLAMA_QUEUE_SIZE", 0, "chats that may wait while another runs; 0 = none may wait"
            ),
            result_ttl=whole_number(
                "CPAI_MODULE_LLAMA_RESULT_TTL", 1, "seconds a finished chat's reply stays readable, e.g. 300"
            ),
            parallel=whole_number(
                "CPAI_MODULE_LLAMA_PARALLEL", 1, "chats decoded together, each with its own context; 1 = one at a time"
            ),
            cache_ram_mb=whole_number(
                "CPAI_MODULE_LLAMA_CACHE_RAM_MB", 0, "MB of RAM for conversations' KV states, e.g. 512; 0 = none"
            ),
            cache_disk_gb=decimal_number(
                "CPAI_MODULE_LLAMA_CACHE_DISK_GB", "GB of disk for conversations' KV states, e.g. 4; 0 = none"
            ),
            cache_dir=_folder(
                "CPAI_MODULE_LLAMA_CACHE_DIR",
                value("CPAI_MODULE_LLAMA_CACHE_DIR"),
                module_dir,
                "conversations' KV states",
                "./conversation-cache",
            ),
            draft_tokens=_draft_tokens(value("CPAI_MODULE_LLAMA_DRAFT_TOKENS")),
        )


def _draft_tokens(raw: str) -> int:
    # From 64 tokens of one sequence in a batch llama.cpp computes logits differently (tests/raw_reference.py).
    number = int(raw) if raw.isdigit() else None
    if number is None or number > MAX_DRAFT_TOKENS:
        raise LlamaSettingsError(
            f"CPAI_MODULE_LLAMA_DRAFT_TOKENS must be a whole number from 0 to {MAX_DRAFT_TOKENS}, not {raw!r} (the "
            "most tokens drafted from the conversation and checked in one pass, e.g. 16; 0 = no speculative decoding)"
        )
    return number


def _folder(name: str, raw: str, module_dir: Path, holds: str, example: str) -> Path:
    if not raw:
        raise LlamaSettingsError(
            f"{name} is empty: set it to the folder that holds {holds} "
            f"(a relative folder is relative to the module folder, e.g. {example})"
        )
    return (module_dir / raw).resolve()


def _model_filename(raw: str) -> str:
    if not raw.lower().endswith(".gguf") or "/" in raw or "\\" in raw:
        raise LlamaSettingsError(
            f"CPAI_MODULE_LLAMA_MODEL_FILENAME must be the name of a .gguf file, without a "
            f"folder (that goes in CPAI_MODULE_LLAMA_MODEL_DIR), not {raw!r}"
        )
    return raw


def _model_repo(raw: str) -> str:
    # The server strips the '@' that keeps a value verbatim; one written by hand in the environment is forgiven.
    repo = raw.lstrip("@")
    if repo and not _REPO_ID.fullmatch(repo):
        raise LlamaSettingsError(
            f"CPAI_MODULE_LLAMA_MODEL_REPO must be a Hugging Face repo id like "
            f"'TheBloke/Mistral-7B-Instruct-v0.2-GGUF', or empty for no download, not {raw!r}"
        )
    return repo


def _model_fileglob(raw: str) -> str:
    if not raw:
        raise LlamaSettingsError(
            "CPAI_MODULE_LLAMA_MODEL_FILEGLOB is empty: set it to the name, or a pattern like "
            "'*.Q4_K_M.gguf', of the file to download from CPAI_MODULE_LLAMA_MODEL_REPO"
        )
    return raw


def _chat_format(raw: str) -> str:
    if raw and raw not in CHAT_FORMATS:
        raise LlamaSettingsError(
            f"CPAI_MODULE_LLAMA_CHAT_FORMAT must be one of {', '.join(CHAT_FORMATS)}, or empty "
            f"to use the model's own chat template, not {raw!r}"
        )
    return raw
