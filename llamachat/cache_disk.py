"""DiskTier: the conversation cache's entries on disk, in a diskcache store private to the server's user.

Each entry is two diskcache values, both plain bytes (diskcache stores bytes as they are, never pickled, so a
tampered file cannot run code): `meta/<key>`, a JSON header (the fingerprint of what the KV bytes are valid for,
their length and BLAKE2b digest, the tokens' digest) followed by the tokens, and `kv/<key>`, the KV bytes. Every
read is checked against the header, so a flipped byte, a truncated file or an entry made for another model or
llama.cpp is dropped, never restored. diskcache writes a value's file before it commits its row, so a crash mid-write
leaves a file without a row, which Cache.check(fix=True) removes at the next start.

Writes run on a thread of their own, so a chat never waits for the disk; the space they need is reserved (older
entries deleted first, least recently used first) before they are queued, so the store stays within its bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diskcache

FORMAT = 1
_META, _KV = "meta/", "kv/"
# Writes queued beyond this many are dropped, oldest first: a disk slower than the chats must not pile up KV bytes
# in memory (the RAM tier's bound would not hold). The entry stays in RAM, only its disk copy is lost.
MAX_PENDING_WRITES = 2
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
DATABASE = "cache.db"  # diskcache's index, beside the value files
HEADER_BYTES = 512  # an entry's JSON header: well under this
DB_HEADROOM = 512 << 10  # room kept for the database to grow between two writes (its log, its pages)

Log = Callable[[str, str], None]


class _PrivateDisk(diskcache.Disk):
    """diskcache's Disk, its value files readable by the server's user only."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        size, mode, filename, db_value = super().store(value, read, key)
        if filename:
            os.chmod(os.path.join(self._directory, filename), PRIVATE_FILE)
        return size, mode, filename, db_value


def entry_size(n_tokens: int, kv_bytes: int) -> int:
    """The bytes an entry takes on disk: its KV bytes, its tokens and its header."""
    return kv_bytes + 4 * n_tokens + HEADER_BYTES


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tokens_bytes(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


@dataclass
class DiskEntry:
    key: str
    tokens: list[int]
    size: int  # bytes on disk: header, tokens and KV


class CorruptEntry(Exception):
    """An entry whose bytes are not what its header says (the message says how)."""


class DiskTier:
    def __init__(self, directory: Path, limit_bytes: int, fingerprint: str, log: Log) -> None:
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.fingerprint = fingerprint
        self.log = log
        _private_dir(self.directory)
        if not (self.directory / DATABASE).exists() and any(self.directory.iterdir()):
            # Opening would make diskcache's repair delete every file it does not know.
            raise ValueError(f"{self.directory} holds other files: give the conversation cache a folder of its own")
        # Eviction is ours (least recently used, before a write); diskcache's own would only cull after one.
        # SQLite's write-ahead log is checkpointed and cut back often, so the database stays within DB_HEADROOM.
        self.cache = diskcache.Cache(
            str(self.directory),
            disk=_PrivateDisk,
            eviction_policy="none",
            size_limit=2**62,
            cull_limit=0,
            sqlite_wal_autocheckpoint=32,
            sqlite_journal_size_limit=DB_HEADROOM // 2,
        )
        for name in os.listdir(self.directory):  # diskcache's own database files
            path = self.directory / name
            if path.is_file():
                os.chmod(path, PRIVATE_FILE)
        self._pending: deque[tuple[str, str, list[int], bytes]] = deque()  # (put|delete, key, tokens, KV bytes)
        self._wake = threading.Condition()
        self._busy = False
        self._closing = False
        self._writer = threading.Thread(target=self._write_loop, name="conversation-cache-writer", daemon=True)
        self._writer.start()

    # --- on the caller's thread -----------------------------------------------------------------------------

    def load_index(self) -> list[DiskEntry]:
        """Every valid entry's tokens and size, oldest first; drops what a crash left half-written and entries made
        for another fingerprint (another model, context size, KV type or llama.cpp)."""
        # Files without rows (a write killed midway) are deleted, rows without files too.
        problems = [p for p in self.cache.check(fix=True) if not issubclass(p.category, diskcache.EmptyDirWarning)]
        if problems:
            self.log("warning", f"conversation cache: removed {len(problems)} half-written values from the disk")
        entries, kv_keys = [], set()
        for key in list(self.cache.iterkeys()):
            if key.startswith(_KV):
                kv_keys.add(key[len(_KV) :])
        for key in list(self.cache.iterkeys()):
            if not key.startswith(_META):
                continue
            name = key[len(_META) :]
            try:
                header, tokens = self._read_meta(name)
            except CorruptEntry as why:
                self._delete_now(name, f"dropped a corrupt entry ({why})")
                continue
            if header["fingerprint"] != self.fingerprint:
                self._delete_now(name, None)  # made for another model or setting: useless now, and not corrupt
                continue
            if name not in kv_keys:
                self._delete_now(name, "dropped an entry whose KV file is missing")
                continue
            entries.append((header["saved_at"], DiskEntry(name, tokens, header["size"])))
            kv_keys.discard(name)
        for name in kv_keys:  # KV bytes whose header never got written
            self.cache.delete(_KV + name)
        entries.sort(key=lambda pair: pair[0])
        return [entry for _, entry in entries]

    def read(self, name: str, tokens: list[int]) -> bytes | None:
        """The KV bytes of an entry, checked; None if it is gone. Raises CorruptEntry (and deletes it) when it does
        not match its header or these tokens."""
        try:
            header, stored_tokens = self._read_meta(name)
            if stored_tokens != tokens or header["fingerprint"] != self.fingerprint:
                raise CorruptEntry("its header does not match the index")
            data = self.cache.get(_KV + name)
            if data is None:
                return None
            if not isinstance(data, bytes) or len(data) != header["kv_bytes"]:
                raise CorruptEntry(
                    f"{len(data) if isinstance(data, bytes) else '?'} KV bytes, not {header['kv_bytes']}"
                )
            if digest(data) != header["kv_digest"]:
                raise CorruptEntry("its KV bytes do not match their checksum")
            return data
        except CorruptEntry:
            self.delete(name)
            raise
        except MissingEntry:
            return None

    def put(self, name: str, tokens: list[int], data: bytes) -> int:
        """Queues the entry's write (its checksum is computed on the writer's thread); returns the bytes it takes."""
        with self._wake:
            while sum(p[0] == "put" for p in self._pending) >= MAX_PENDING_WRITES:
                dropped = next(p for p in self._pending if p[0] == "put")
                self._pending.remove(dropped)
                self.log("warning", "conversation cache: the disk is slower than the chats; one entry was not saved")
            self._pending.append(("put", name, tokens, data))
            self._wake.notify()
        return entry_size(len(tokens), len(data))

    def delete(self, name: str) -> None:
        with self._wake:
            self._pending = deque(p for p in self._pending if p[1] != name)
            self._pending.append(("delete", name, [], b""))
            self._wake.notify()

    def overhead_bytes(self) -> int:
        """What diskcache's own database takes beside the entries, with room for it to grow."""
        total = DB_HEADROOM
        for name in (DATABASE, DATABASE + "-wal", DATABASE + "-shm"):
            try:
                total += (self.directory / name).stat().st_size
            except OSError:
                pass
        return total

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued write is on disk; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def clear(self) -> None:
        with self._wake:
            self._pending.clear()
        self.flush()
        self.cache.clear()

    def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._writer.join()
        self.cache.close()

    # --- helpers ----------------------------------------------------------------------------------------------

    def _read_meta(self, name: str) -> tuple[dict, list[int]]:
        raw = self.cache.get(_META + name)
        if raw is None:
            raise MissingEntry(name)
        try:
            line, body = raw.split(b"\n", 1)
            header = json.loads(line)
            if header["format"] != FORMAT or digest(body) != header["tokens_digest"]:
                raise ValueError("its tokens do not match their checksum")
            tokens = array("i")
            tokens.frombytes(body)
            return header, tokens.tolist()
        except (ValueError, KeyError, TypeError, AttributeError) as ex:
            raise CorruptEntry(f"unreadable header: {ex}") from None

    def _header(self, tokens: list[int], data: bytes) -> bytes:
        body = tokens_bytes(tokens)
        header = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "saved_at": time.time(),
            "size": entry_size(len(tokens), len(data)),
            "kv_bytes": len(data),
            "kv_digest": digest(data),
            "tokens_digest": digest(body),
        }
        return json.dumps(header).encode() + b"\n" + body

    def _delete_now(self, name: str, why: str | None) -> None:
        self.cache.delete(_META + name)
        self.cache.delete(_KV + name)
        if why:
            self.log("warning", f"conversation cache: {why}")

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                kind, name, tokens, data = self._pending.popleft()
                self._busy = True
            try:
                if kind == "put":
                    # The KV bytes first, the header last: an entry is only found through its header.
                    self.cache.set(_KV + name, data)
                    self.cache.set(_META + name, self._header(tokens, data))
                else:
                    self._delete_now(name, None)
            except Exception as ex:  # disk full, folder removed, database locked: the entry is simply not kept
                self.log("warning", f"conversation cache: could not write to {self.directory}: {ex}")
                self._delete_quietly(name)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()

    def _delete_quietly(self, name: str) -> None:
        try:
            self._delete_now(name, None)
        except Exception:  # the store itself is failing: the next start's check repairs it
            pass


class MissingEntry(Exception):
    """The entry is no longer on disk (cleared, or deleted by another process)."""


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if stat.S_IMODE(directory.stat().st_mode) != PRIVATE_DIR:
        os.chmod(directory, PRIVATE_DIR)
