"""The conversation cache's tiers and index, without a model: entries are token lists with stand-in KV bytes (the
model tests, test_conversation_restore.py, restore real ones). Longest-prefix lookup, one entry per conversation,
LRU bounds held after every save, the disk tier across a restart, private files, corrupt, truncated, foreign and
half-written entries dropped, a kill -9 in the middle of writing."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from live_server import ROOT, poll
from llamachat.cache_disk import HEADER_BYTES
from llamachat.conversation_cache import BLOCK, ConversationCache

FINGERPRINT = "a" * 32


def conversation(seed: int, length: int) -> list[int]:
    """Tokens every conversation shares (a system prompt), then its own."""
    return list(range(40)) + [1000 * (seed + 1) + i for i in range(length - 40)]


def kv(tokens: list[int], size: int = 4000) -> bytes:
    """Stand-in KV bytes, different for every token list."""
    return (str(tokens).encode() * (size // 8 + 1))[:size]


def logged():
    lines: list[tuple[str, str]] = []
    return lines, lambda level, message: lines.append((level, message))


def files_under(directory: Path) -> list[Path]:
    return [Path(root) / name for root, _dirs, names in os.walk(directory) for name in names]


def disk_usage(directory: Path) -> int:
    return sum(path.stat().st_size for path in files_under(directory))


def holds(cache: ConversationCache, tokens: list[int]) -> bool:
    """Whether the cache restores these very tokens for a prompt that continues them."""
    hit = cache.find(tokens + [1], 0)
    return hit is not None and hit.tokens == tokens


def test_the_longest_cached_prefix_is_found_and_capped_below_the_prompt():
    cache = ConversationCache(FINGERPRINT, 10**7, 0, None)
    a, b = conversation(1, 300), conversation(2, 200)
    cache.save(a, kv(a))
    cache.save(b, kv(b))
    follow_up = a + [7, 8, 9]
    hit = cache.find(follow_up, 0)
    assert (hit.source, hit.tokens, hit.prefix, hit.state) == ("ram", a, len(a), kv(a))
    # A prompt that leaves the conversation inside a block still gets every shared token.
    edited = a[:150] + [5] * 60
    assert cache.find(edited, 0).prefix == 150
    # The prompt itself cached: one token is left to evaluate, for fresh logits.
    assert cache.find(a, 0).prefix == len(a) - 1
    # Another conversation shares the system prompt (40 tokens): worth restoring into an empty context, not when
    # the live context holds all but less than a block of it.
    assert cache.find(conversation(3, 200), 0).prefix == 40
    assert cache.find(conversation(3, 200), 40 - BLOCK + 1) is None
    assert cache.find(follow_up, len(a) - BLOCK + 1) is None
    assert cache.find(follow_up, len(a) - BLOCK).prefix == len(a)


def test_a_conversation_s_new_turn_replaces_its_previous_entry():
    cache = ConversationCache(FINGERPRINT, 10**7, 0, None)
    turn1 = conversation(1, 100)
    turn2 = turn1 + list(range(500, 580))
    other = conversation(2, 100)
    for tokens in (turn1, other, turn2):
        cache.save(tokens, kv(tokens))
    assert cache.stats()["ramEntries"] == 2
    assert cache.find(turn2 + [1], 0).tokens == turn2
    assert cache.find(other + [1], 0).tokens == other


def test_the_ram_tier_evicts_the_least_recently_used_and_never_exceeds_its_bound():
    entry_bytes = 4000 + 4 * 100
    lines, log = logged()
    cache = ConversationCache(FINGERPRINT, 3 * entry_bytes, 0, None, log)
    chats = [conversation(i, 100) for i in range(5)]
    for i, tokens in enumerate(chats):
        cache.save(tokens, kv(tokens))
        assert cache.stats()["ramBytes"] <= 3 * entry_bytes
        if i == 2:
            assert holds(cache, chats[0])  # used again: now the most recent
    assert cache.stats()["ramEntries"] == 3
    kept = [tokens for tokens in chats if holds(cache, tokens)]
    assert kept == [chats[0], chats[3], chats[4]]  # 1 and 2 went: 0 was used after them
    assert cache.stats()["evictedFromRam"] == 2
    assert sum("evicted" in m for _, m in lines) == 2


def test_zero_turns_a_tier_off_and_an_entry_too_big_for_every_tier_is_not_kept(tmp_path):
    off = ConversationCache(FINGERPRINT, 0, 0, tmp_path)
    assert not off.enabled
    assert off.disk is None
    tokens = conversation(1, 100)
    off.save(tokens, kv(tokens))
    assert off.find(tokens + [1], 0) is None
    small = ConversationCache(FINGERPRINT, 1000, 0, None)
    small.save(tokens, kv(tokens))
    assert small.find(tokens + [1], 0) is None
    assert small.stats()["ramEntries"] == 0


def test_of_two_entries_sharing_as_much_the_one_in_ram_is_taken(tmp_path):
    shared = conversation(1, 100)
    x, y = shared + [1] * 40, shared + [2] * 40
    cache = ConversationCache(FINGERPRINT, 5000, 10**8, tmp_path)  # RAM for one entry: x goes to disk only
    cache.save(x, kv(x))
    cache.save(y, kv(y))
    hit = cache.find(shared + [3] * 40, 0)
    assert (hit.source, hit.tokens, hit.prefix) == ("ram", y, len(shared))
    cache.close()


def test_the_disk_tier_outlives_the_process_and_its_files_are_private(tmp_path):
    directory = tmp_path / "cache"
    cache = ConversationCache(FINGERPRINT, 10**7, 10**8, directory)
    a = conversation(1, 300)
    cache.save(a, kv(a, 100_000))  # large enough for a file of its own
    assert cache.flush(30)
    cache.close()

    again = ConversationCache(FINGERPRINT, 10**7, 10**8, directory)
    hit = again.find(a + [1], 0)
    assert (hit.source, hit.tokens, hit.state) == ("disk", a, kv(a, 100_000))
    assert again.find(a + [1], 0).source == "ram"  # read once, then kept in RAM
    again.close()

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert files_under(directory)
    for path in files_under(directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_entries_made_for_another_model_or_setting_are_dropped(tmp_path):
    cache = ConversationCache(FINGERPRINT, 0, 10**8, tmp_path)
    a = conversation(1, 300)
    cache.save(a, kv(a))
    cache.close()
    other = ConversationCache("b" * 32, 0, 10**8, tmp_path)
    assert other.find(a + [1], 0) is None
    assert other.stats()["diskEntries"] == 0
    other.close()
    assert ConversationCache(FINGERPRINT, 0, 10**8, tmp_path).stats()["diskEntries"] == 0  # gone for good


def kv_file(directory: Path, size: int) -> Path:
    (found,) = [p for p in files_under(directory) if p.suffix == ".val" and p.stat().st_size == size]
    return found


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied"])
def test_a_damaged_entry_is_dropped_not_restored(tmp_path, damage):
    a, b = conversation(1, 300), conversation(2, 300)
    cache = ConversationCache(FINGERPRINT, 0, 10**8, tmp_path)
    cache.save(a, kv(a, 100_000))
    cache.save(b, kv(b, 100_001))
    cache.flush(30)
    cache.close()
    path = kv_file(tmp_path, 100_000)
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncated":
        del data[len(data) // 3 :]
    else:
        data.clear()
    path.write_bytes(bytes(data))

    lines, log = logged()
    restarted = ConversationCache(FINGERPRINT, 0, 10**8, tmp_path, log)
    assert restarted.find(a + [1], 0) is None
    stats = restarted.stats()
    assert stats["droppedCorrupt"] == 1
    assert stats["diskEntries"] == 1
    assert any(level == "warning" and "corrupt" in message for level, message in lines)
    assert restarted.find(b + [1], 0).state == kv(b, 100_001)  # the other entry is untouched
    restarted.flush(30)
    restarted.close()
    assert ConversationCache(FINGERPRINT, 0, 10**8, tmp_path).stats()["diskEntries"] == 1


def test_a_damaged_header_is_dropped_when_the_cache_opens(tmp_path):
    import diskcache

    a = conversation(1, 300)
    cache = ConversationCache(FINGERPRINT, 0, 10**8, tmp_path)
    cache.save(a, kv(a))
    cache.close()
    store = diskcache.Cache(str(tmp_path))
    (meta,) = [key for key in store.iterkeys() if key.startswith("meta/")]
    header = bytearray(store[meta])
    header[-1] ^= 0x01  # a token of the entry changed: its checksum no longer matches
    store[meta] = bytes(header)
    store.close()
    lines, log = logged()
    restarted = ConversationCache(FINGERPRINT, 0, 10**8, tmp_path, log)
    assert restarted.stats()["diskEntries"] == 0
    assert restarted.find(a + [1], 0) is None
    assert any("corrupt" in message for _, message in lines)


def test_the_disk_tier_stays_within_its_bound_evicting_the_least_recently_used(tmp_path):
    limit = 2_000_000
    entry = 300_000
    cache = ConversationCache(FINGERPRINT, 0, limit, tmp_path)
    chats = [conversation(i, 100) for i in range(12)]
    for tokens in chats:
        cache.save(tokens, kv(tokens, entry))
        assert cache.flush(30)
        assert disk_usage(tmp_path) <= limit
        assert cache.stats()["diskBytes"] <= limit
    stats = cache.stats()
    assert stats["evictedFromDisk"] > 0
    assert stats["diskEntries"] * (entry + 4 * 100 + HEADER_BYTES) <= limit
    assert holds(cache, chats[-1])
    assert not holds(cache, chats[0])
    cache.close()


def test_clearing_deletes_every_entry(tmp_path):
    from clear_conversation_cache import main as clear_main

    a = conversation(1, 300)
    cache = ConversationCache(FINGERPRINT, 10**7, 10**8, tmp_path)
    cache.save(a, kv(a, 100_000))
    cache.flush(30)
    cache.close()
    assert clear_main(["--dir", str(tmp_path)]) == 0
    assert ConversationCache(FINGERPRINT, 0, 10**8, tmp_path).stats()["diskEntries"] == 0
    assert not [p for p in files_under(tmp_path) if p.suffix == ".val"]
    assert clear_main(["--dir", str(tmp_path / "nothing-here")]) == 0  # no cache there: nothing deleted, no error
    assert not (tmp_path / "nothing-here").exists()


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from llamachat.conversation_cache import ConversationCache

    cache = ConversationCache("a" * 32, 0, 60_000_000, sys.argv[1])
    for i in range(10_000):
        tokens = [100_000 + 1000 * i + k for k in range(100)]
        cache.save(tokens, bytes([i % 251]) * 4_000_000)
        if i == 1:
            cache.flush()
            print("two written", flush=True)
    """
)


def values_in(directory: Path) -> list[Path]:
    """diskcache's value files (each entry's KV bytes; its header is small enough for the database)."""
    return [path for path in files_under(directory) if path.suffix == ".val"]


def test_a_kill_9_while_writing_leaves_only_whole_entries(tmp_path):
    directory = tmp_path / "cache"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "two written"
        # The writer saves faster than its disk thread writes, so that thread is always inside a 4 MB write: once a
        # third value file exists, the kill lands in the middle of one write or another.
        poll(lambda: len(values_in(directory)) > 2, 30, "a third entry to be written")
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    lines, log = logged()
    cache = ConversationCache(FINGERPRINT, 0, 60_000_000, directory, log)
    entries = cache.stats()["diskEntries"]
    assert entries >= 2
    assert len(values_in(directory)) == entries  # the file being written when the process died is gone
    found = 0
    for i in range(1000):
        tokens = [100_000 + 1000 * i + k for k in range(100)]
        hit = cache.find(tokens + [1], 0)
        if hit is not None:
            assert hit.state == bytes([i % 251]) * 4_000_000
            found += 1
    assert found == entries
    assert cache.stats()["droppedCorrupt"] == 0
    assert disk_usage(directory) <= 60_000_000
    cache.close()


FULL_DISK_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from llamachat.conversation_cache import ConversationCache

    # No file of this process may grow past 3 MB: the kernel refuses the write midway (EFBIG), as a full disk does
    # (ENOSPC). SIGXFSZ, which would also end the process, is ignored: a full disk sends no signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
    warnings = []

    def log(level, text):
        warnings.append(level + " " + text)

    cache = ConversationCache("a" * 32, 0, 60_000_000, sys.argv[1], log)
    big, small = list(range(100, 200)), list(range(300, 400))
    cache.save(big, b"b" * 4_000_000)
    cache.save(small, b"s" * 1_000_000)
    cache.flush()
    print(cache.find(big + [1], 0) is None, cache.find(small + [1], 0) is not None)
    print(*warnings, sep="\\n")
    cache.close()
    """
)


def test_a_write_the_disk_refuses_midway_keeps_no_entry_and_the_next_one_is_kept(tmp_path):
    directory = tmp_path / "cache"
    writer = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(directory), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert writer.returncode == 0, writer.stderr
    found, *warnings = writer.stdout.splitlines()
    assert found == "True True"  # the 4 MB entry was not kept; the 1 MB one after it was
    assert any(w.startswith("warning conversation cache: could not write") for w in warnings), warnings
    lines, log = logged()
    cache = ConversationCache(FINGERPRINT, 0, 60_000_000, directory, log)
    assert cache.stats()["diskEntries"] == 1
    assert len(values_in(directory)) == 1  # no half-written file of the refused entry is left
    hit = cache.find(list(range(300, 400)) + [1], 0)
    assert hit.state == b"s" * 1_000_000
    assert cache.stats()["droppedCorrupt"] == 0
    cache.close()
