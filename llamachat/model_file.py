"""A model file in models/ and the record of what it should be, so that a truncated or damaged file is never loaded.

A download through fetch_model.py leaves `<model>.download.json` beside the model: its size and the SHA-256 the
Hugging Face Hub gave for it. The install checks the whole file against that hash; the module, when it loads the
model, only does the cheap checks (the GGUF magic, the size), which catch an interrupted copy without reading 4 GB.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
RECORD_SUFFIX = ".download.json"
# A file being written takes this suffix until it is whole: a download (kept to resume from), a copy, a package.
PARTIAL_SUFFIX = ".partial"
READ_BLOCK = 1 << 20  # bytes read at a time from a model file or a download
# The small model: what `install.sh --small` installs, and what the module loads when the configured one fails.
SMALL_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Beside the small model when an install chose it (--small): the module then runs on it rather than downloading the
# configured model (4.4 GB by default) behind the user's back. An install of the configured model removes it.
SMALL_MODEL_CHOSEN = SMALL_MODEL_FILENAME + ".chosen"


@dataclass(frozen=True)
class ModelRecord:
    size: int  # bytes
    sha256: str  # hex, as the Hub gives it
    source: str  # where it came from, e.g. "owner/name@commit/file.gguf"; for people reading the record


def record_path(model: Path) -> Path:
    return model.with_name(model.name + RECORD_SUFFIX)


def read_record(model: Path) -> ModelRecord | None:
    """The model's record, or None when there is none (or it cannot be read: then the file is checked as unrecorded)."""
    try:
        fields = json.loads(record_path(model).read_text(encoding="utf-8"))
        return ModelRecord(size=int(fields["size"]), sha256=str(fields["sha256"]).lower(), source=str(fields["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(model: Path, record: ModelRecord) -> None:
    record_path(model).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")


def remove_model(model: Path) -> None:
    """The model file and its record."""
    model.unlink(missing_ok=True)
    record_path(model).unlink(missing_ok=True)


def small_model_chosen(models_dir: Path) -> bool:
    """Whether the last install into models_dir chose the small model on purpose."""
    return (models_dir / SMALL_MODEL_CHOSEN).is_file()


def choose_small_model(models_dir: Path, chosen: bool) -> None:
    """Records (or, for an install of the configured model, forgets) that the small model was chosen."""
    marker = models_dir / SMALL_MODEL_CHOSEN
    if chosen:
        marker.write_text("install.sh --small (or LLAMACHAT_MODEL=small) chose the small model\n", encoding="utf-8")
    else:
        marker.unlink(missing_ok=True)


def quick_problem(model: Path) -> str | None:
    """What is wrong with the model file that is cheap to see (no GGUF magic, not the recorded size); None if nothing.
    A file without a record gets the magic check only."""
    try:
        size = model.stat().st_size
        with model.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    record = read_record(model)
    if record is not None and size != record.size:
        return f"is {size} bytes, but the download recorded {record.size} (an interrupted download or copy?)"
    if magic != GGUF_MAGIC:
        return f"is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def full_problem(model: Path, expected: ModelRecord) -> str | None:
    """What is wrong with the model file against `expected` (size, magic, then the SHA-256 of every byte); None if
    nothing."""
    problem = quick_problem(model)
    if problem is None and model.stat().st_size != expected.size:
        problem = f"is {model.stat().st_size} bytes, not the {expected.size} of {expected.source}"
    if problem is None and sha256_of(model) != expected.sha256:
        problem = f"has a SHA-256 different from {expected.source}'s ({expected.sha256}): its bytes are damaged"
    return problem
