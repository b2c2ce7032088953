"""python clear_conversation_cache.py [--dir DIR]: deletes the conversations' KV states the module keeps on disk.

They encode users' conversations (conversation_cache.py). The folder is CPAI_MODULE_LLAMA_CACHE_DIR, read as the
module reads it (modulesettings.json, then the environment). A running module still holds the entries of its RAM
tier until it restarts; the entries on disk are gone at once (a module that looks one up finds nothing and
evaluates the chat).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import diskcache

from llamachat.cache_disk import DATABASE
from llamachat.llama_settings import LlamaSettings, LlamaSettingsError


def clear(directory: Path) -> tuple[int, int]:
    """Deletes every entry in the folder; returns (values deleted, bytes they took)."""
    cache = diskcache.Cache(str(directory))
    try:
        size = cache.volume()
        return cache.clear(), size
    finally:
        cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--dir", type=Path, help="the cache folder (default: CPAI_MODULE_LLAMA_CACHE_DIR)")
    args = parser.parse_args(argv)
    directory = args.dir
    if directory is None:
        try:
            directory = LlamaSettings.from_env().cache_dir
        except LlamaSettingsError as ex:
            parser.error(str(ex))
    if not (directory / DATABASE).is_file():
        print(f"No conversation cache in {directory}: nothing to delete.")
        return 0
    count, size = clear(directory)
    print(f"Deleted the conversation cache in {directory}: {count // 2} conversations, {size / 1e6:.1f} MB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
