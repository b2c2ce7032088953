"""Downloads one model file safely: room on the disk first, resumable, and only kept when its SHA-256 is right.

The bytes go to `<model>.partial`; an interrupted download leaves it there and the next run asks the server for the
rest only (an HTTP Range request). The finished file gets its hash checked before it takes the model's name, so a
file in models/ is always either whole and verified or not there at all.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.request
from pathlib import Path

from llamachat.model_file import PARTIAL_SUFFIX, READ_BLOCK, ModelRecord, sha256_of, write_record

ATTEMPTS = 3  # connections per run; each one resumes where the previous one stopped
TIMEOUT_S = 30  # per connect or read: a stalled connection counts as a dropped one


class DownloadError(Exception):
    """The download did not give a verified file; the message says what happened and what to do."""


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def part_path(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL_SUFFIX)


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def download(url: str, headers: dict[str, str], target: Path, expected: ModelRecord) -> None:
    """Fetches `url` into `target` and writes its record, or raises DownloadError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    have = part.stat().st_size if part.is_file() else 0
    if have > expected.size:  # left by a different file of the same name
        part.unlink()
        have = 0
    needed, free = expected.size - have, free_disk_bytes(target.parent)
    if needed > free:
        raise DownloadError(
            f"not enough free disk space in {target.parent}: {target.name} needs {gigabytes(needed)} more, "
            f"and only {gigabytes(free)} is free. Free some space, or set CPAI_MODULE_LLAMA_MODEL_DIR to a folder on "
            f"a disk with room, then run the install again."
        )
    if have:
        print(f"Resuming the download: {gigabytes(have)} of {gigabytes(expected.size)} are already in {part}")

    with part.open("r+b" if have else "wb") as f:
        f.seek(have)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _fetch_rest(url, headers, f, expected.size)
                break
            except (OSError, http.client.HTTPException) as error:
                got = f.tell()
                print(f"The connection failed after {gigabytes(got)} of {gigabytes(expected.size)}: {error!r}")
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f"the download of {target.name} failed {ATTEMPTS} times; the {gigabytes(got)} received are "
                        f"kept in {part}: run the install again to download the rest"
                    ) from error
    print(f"Checking the SHA-256 of {part.name}")
    digest = sha256_of(part)
    if digest != expected.sha256:
        part.unlink()
        raise DownloadError(
            f"the downloaded {target.name} has the SHA-256 {digest}, not the {expected.sha256} of "
            f"{expected.source}: the damaged file was deleted; run the install again"
        )
    os.replace(part, target)
    write_record(target, expected)


def _fetch_rest(url: str, headers: dict[str, str], part, size: int) -> None:
    """Appends the bytes from part's end up to `size` to the open file `part`; raises when the answer stops short."""
    from huggingface_hub.utils import tqdm  # the Hub's progress bar: HF_HUB_DISABLE_PROGRESS_BARS turns it off

    have = part.tell()
    if have == size:
        return
    request = urllib.request.Request(url, headers={**headers, "Range": f"bytes={have}-"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if response.status != 206 or not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            # The server sends the whole file instead of the rest: start again from its first byte.
            part.seek(0)
            part.truncate()
        with tqdm(total=size, initial=part.tell(), unit="B", unit_scale=True, desc=part.name) as bar:
            while block := response.read(READ_BLOCK):
                part.write(block)
                bar.update(len(block))
    if part.tell() != size:
        raise http.client.IncompleteRead(b"", size - part.tell())
