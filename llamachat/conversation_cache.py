"""ConversationCache: conversations' KV states kept in RAM and on disk, so a returning conversation restores its
earlier turns instead of evaluating them again.

After every chat the runner saves the state of the conversation (prompt and reply tokens, with their KV bytes from
kv_state.capture); before a chat it asks for the entry sharing the longest prefix with the prompt. The tiers:
- RAM: up to ram_bytes of entries, least recently used evicted first;
- disk (cache_disk.DiskTier): every entry is also written there, off the chat's thread, up to disk_bytes, least
  recently used evicted first; it outlives the process.

Finding the longest prefix does not scan the entries: tokens are cut into blocks of BLOCK, and each entry is indexed
under the chained hash of each of its whole blocks (hash k covers tokens[:k * BLOCK]). A prompt's chain is walked
until a hash is unknown; the entries under the deepest known one share at least that many tokens, and only a few of
them are compared token by token. A conversation's new entry replaces its previous one (a prefix of it), so the
cache holds one entry per conversation rather than one per turn.

Thread-safe: the llama thread (or the batch decoder's) finds and saves, the SDK's thread reads stats().
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llamachat.cache_disk import CorruptEntry, DiskTier, entry_size

BLOCK = 32  # tokens per indexed block: a hit restores at least this many tokens more than the live context holds
CANDIDATES = 8  # entries compared token by token at the deepest matching block
SOURCES = ("context", "ram", "disk", "none")

# glibc's mallopt(M_MMAP_THRESHOLD, ...): buffers from this size on are mapped on their own, and unmapped when freed.
M_MMAP_THRESHOLD, MMAP_FROM_BYTES = -3, 1 << 20

Log = Callable[[str, str], None]


def _return_freed_buffers() -> None:
    """glibc raises its mmap threshold to the size of the largest buffer freed (up to 32 MB), after which KV bytes
    come from the heap, whose freed pages it keeps: the module's RSS grew by twice the RAM tier's bound
    (bench.conversations; 156 MB against a 58 MB tier in a loop of saves, 61 MB with a fixed threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): no such threshold to fix
        pass


def block_chain(tokens: list[int]) -> list[bytes]:
    """chain[k]: the hash of tokens[:(k + 1) * BLOCK], for every whole block."""
    raw = array("i", tokens).tobytes()
    step, chain, previous = BLOCK * 4, [], b""
    for start in range(0, len(tokens) // BLOCK * step, step):
        previous = hashlib.blake2b(previous + raw[start : start + step], digest_size=16).digest()
        chain.append(previous)
    return chain


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    key: str
    tokens: list[int]
    chain: list[bytes]
    state: bytes | None = None  # the KV bytes while the entry is in RAM
    disk_bytes: int = 0  # bytes reserved on disk, 0 while it is not there


@dataclass
class Hit:
    source: str  # "ram" or "disk"
    tokens: list[int]  # the entry's tokens: its KV bytes hold them all
    prefix: int  # how many of them the prompt shares (at most the prompt's length - 1)
    state: bytes


@dataclass
class CacheCounts:
    sources: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    evicted_ram: int = 0
    evicted_disk: int = 0
    dropped_corrupt: int = 0


class ConversationCache:
    def __init__(
        self, fingerprint: str, ram_bytes: int, disk_bytes: int, directory: Path | None, log: Log | None = None
    ) -> None:
        """ram_bytes, disk_bytes: each tier's bound, 0 = that tier off. directory: the disk tier's folder."""
        self.fingerprint = fingerprint
        self.ram_limit = ram_bytes
        self.disk_limit = disk_bytes if directory is not None else 0
        self.log = log or (lambda _level, _message: None)
        self.counts = CacheCounts()
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._ram: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._disk: OrderedDict[str, int] = OrderedDict()
        self._ram_used = self._disk_used = 0
        self._through: dict[bytes, set[str]] = {}  # chain hash -> entries holding that prefix
        self._ends: dict[bytes, set[str]] = {}  # chain hash of an entry's last whole block -> those entries
        self.disk: DiskTier | None = None
        if self.enabled:
            _return_freed_buffers()
        if self.disk_limit > 0:
            try:
                if directory is None:
                    raise ValueError("no folder was given for it")
                self.disk = DiskTier(Path(directory), self.disk_limit, fingerprint, self.log)
            except (OSError, ValueError) as ex:
                self.log("error", f"conversation cache: no disk tier, only RAM: {ex}")
                self.disk_limit = 0
        if self.disk is not None:
            for found in self.disk.load_index():
                entry = Entry(found.key, found.tokens, block_chain(found.tokens), disk_bytes=found.size)
                self._add(entry)
                self._disk[entry.key] = found.size
                self._disk_used += found.size

    @property
    def enabled(self) -> bool:
        return self.ram_limit > 0 or self.disk_limit > 0

    # --- finding ---------------------------------------------------------------------------------------------

    def find(self, tokens: list[int], at_least: int) -> Hit | None:
        """The entry sharing the longest prefix with these prompt tokens, if it shares at least BLOCK more than
        at_least (what the live context already holds). A disk entry is read, checked and moved into RAM."""
        chain = block_chain(tokens)
        with self._lock:
            depth = self._deepest(chain)
            if depth < 0 or (depth + 2) * BLOCK - 1 < at_least + BLOCK:  # none could share enough
                return None
            best, best_prefix = None, 0
            for key in list(self._through[chain[depth]])[:CANDIDATES]:
                entry = self._entries[key]
                prefix = min(common_prefix(entry.tokens, tokens), len(tokens) - 1)
                in_ram_instead = best is not None and best.state is None and entry.state is not None
                if prefix > best_prefix or (prefix == best_prefix and in_ram_instead):
                    best, best_prefix = entry, prefix  # equal prefixes: one in RAM beats one on disk
            if best is None or best_prefix < at_least + BLOCK:
                return None
            self._touch(best)
            if best.state is not None:
                return Hit("ram", best.tokens, best_prefix, best.state)
            key, entry_tokens = best.key, best.tokens
        try:  # outside the lock: reading and checking may take a while, and stats() must not wait for it
            state = self._disk_tier().read(key, entry_tokens)
        except CorruptEntry as why:
            with self._lock:
                self.counts.dropped_corrupt += 1
                self._forget(key)
            self.log("warning", f"conversation cache: dropped a corrupt entry on disk ({why}); the chat is evaluated")
            return None
        if state is None:
            with self._lock:
                self._forget(key)
            return None
        with self._lock:
            if key in self._entries:
                self._keep_in_ram(self._entries[key], state)
        return Hit("disk", entry_tokens, best_prefix, state)

    def _deepest(self, chain: list[bytes]) -> int:
        """The last block of the chain some entry holds (blocks form a chain, so every earlier one is held too)."""
        low, high = 0, len(chain) - 1
        if high < 0 or chain[0] not in self._through:
            return -1
        while low < high:  # binary search: a prefix of the chain is held, the rest is not
            middle = (low + high + 1) // 2
            if chain[middle] in self._through:
                low = middle
            else:
                high = middle - 1
        return low

    # --- saving ----------------------------------------------------------------------------------------------

    def save(self, tokens: list[int], state: bytes) -> None:
        """Keeps the conversation's KV bytes (state, holding these tokens); replaces its entries that are a
        prefix of it. Writing to disk happens on the disk tier's own thread."""
        if not state or len(tokens) < BLOCK or not self.enabled:
            return
        entry = Entry(secrets.token_hex(16), list(tokens), block_chain(tokens))
        with self._lock:
            for old in self._prefixes_of(entry):
                self._forget(old)
            self._add(entry)
            self._keep_in_ram(entry, state)
            if self.disk is not None:
                self._keep_on_disk(entry, state)
            if not entry.state and not entry.disk_bytes:
                self._forget(entry.key)  # too big for either tier

    def _prefixes_of(self, entry: Entry) -> list[str]:
        """Entries whose tokens are a prefix of entry's (the earlier turns of the same conversation)."""
        found = []
        for k, h in enumerate(entry.chain):
            for key in self._ends.get(h, ()):
                old = self._entries[key]
                if len(old.tokens) < (k + 2) * BLOCK and old.tokens == entry.tokens[: len(old.tokens)]:
                    found.append(key)
        return found

    def _keep_in_ram(self, entry: Entry, state: bytes) -> None:
        size = len(state) + 4 * len(entry.tokens)
        if size > self.ram_limit:
            return
        while self._ram_used + size > self.ram_limit:
            key, freed = self._ram.popitem(last=False)
            self._ram_used -= freed
            self._entries[key].state = None
            self.counts.evicted_ram += 1
            self.log("info", f"conversation cache: evicted an entry from RAM ({freed / 1e6:.1f} MB)")
            if not self._entries[key].disk_bytes:
                self._forget(key)
        entry.state = state
        self._ram[entry.key] = size
        self._ram_used += size

    def _keep_on_disk(self, entry: Entry, state: bytes) -> None:
        room = self.disk_limit - self._disk_tier().overhead_bytes()
        size = entry_size(len(entry.tokens), len(state))
        if size > room:
            return
        while self._disk_used + size > room:
            key, freed = self._disk.popitem(last=False)
            self._disk_used -= freed
            self.counts.evicted_disk += 1
            self.log("info", f"conversation cache: evicted an entry from disk ({freed / 1e6:.1f} MB)")
            self._disk_tier().delete(key)
            self._entries[key].disk_bytes = 0
            if self._entries[key].state is None:
                self._forget(key)
        entry.disk_bytes = self._disk_tier().put(entry.key, entry.tokens, state)
        self._disk[entry.key] = entry.disk_bytes
        self._disk_used += entry.disk_bytes

    # --- the index ---------------------------------------------------------------------------------------------

    def _add(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        for h in entry.chain:
            self._through.setdefault(h, set()).add(entry.key)
        if entry.chain:
            self._ends.setdefault(entry.chain[-1], set()).add(entry.key)

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for h in entry.chain:
            holders = self._through[h]
            holders.discard(key)
            if not holders:
                del self._through[h]
        if entry.chain:
            enders = self._ends[entry.chain[-1]]
            enders.discard(key)
            if not enders:
                del self._ends[entry.chain[-1]]
        self._ram_used -= self._ram.pop(key, 0)
        on_disk = self._disk.pop(key, None)
        if on_disk is not None:
            self._disk_used -= on_disk
            self._disk_tier().delete(key)

    def _disk_tier(self) -> DiskTier:
        """The disk tier, where an entry on disk says there is one."""
        assert self.disk is not None, "an entry on disk without a disk tier"
        return self.disk

    def _touch(self, entry: Entry) -> None:
        if entry.key in self._ram:
            self._ram.move_to_end(entry.key)
        if entry.key in self._disk:
            self._disk.move_to_end(entry.key)

    # --- what it holds ---------------------------------------------------------------------------------------

    def count(self, source: str) -> None:
        """Notes where a chat's prefix came from (one of SOURCES)."""
        with self._lock:
            self.counts.sources[source] += 1

    def stats(self) -> dict[str, object]:
        with self._lock:
            sources = dict(self.counts.sources)
            chats = sum(sources.values())
            return {
                "ramEntries": len(self._ram),
                "ramBytes": self._ram_used,
                "ramLimitBytes": self.ram_limit,
                "diskEntries": len(self._disk),
                "diskBytes": self._disk_used,
                "diskLimitBytes": self.disk_limit,
                "prefixSources": sources,
                "hitRate": round((sources["ram"] + sources["disk"]) / chats, 3) if chats else None,
                "evictedFromRam": self.counts.evicted_ram,
                "evictedFromDisk": self.counts.evicted_disk,
                "droppedCorrupt": self.counts.dropped_corrupt,
            }

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every entry saved so far is on disk (True at once without a disk tier)."""
        return self.disk.flush(timeout) if self.disk is not None else True

    def clear(self) -> None:
        """Forgets every entry, in RAM and on disk."""
        with self._lock:
            for key in list(self._entries):
                self._forget(key)
        if self.disk is not None:
            self.disk.clear()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
