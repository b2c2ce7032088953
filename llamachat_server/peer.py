"""Who is on the other end of a loopback TCP connection, read from Linux's /proc (no extra package, no root).

The peer's own socket is the line of /proc/net/tcp{,6} whose local address is the connection's remote end and
whose remote address is this server's end; that line gives the socket's owner uid and inode, and the process
holding `socket:[<inode>]` among its /proc/<pid>/fd owns it. Elsewhere (no /proc) nothing can be resolved.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TABLES = ("tcp", "tcp6")


@dataclass(frozen=True)
class PeerSocket:
    inode: int
    uid: int


def can_resolve_peers() -> bool:
    return (PROC / "net" / "tcp").is_file()


def normal_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as Python's sockets give it ('::1', '::ffff:127.0.0.1', 'fe80::1%lo'), IPv4-mapped → IPv4:
    a dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1 while the client's socket is plain IPv4."""
    ip = ipaddress.ip_address(text.split("%")[0])
    return (ip.ipv4_mapped or ip) if ip.version == 6 else ip


def _proc_forms(address: str, port: int) -> list[tuple[str, str]]:
    """(table, 'ADDRESS:PORT') as /proc/net/tcp{,6} print this end of a connection: each 32-bit word of the address
    in host order, in upper-case hex. An IPv4 address may also sit in tcp6, IPv4-mapped, on a dual-stack socket."""
    ip = normal_ip(address)

    def words(raw: bytes) -> str:
        return "".join(f"{int.from_bytes(raw[i : i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4))

    if ip.version == 6:
        return [("tcp6", f"{words(ip.packed)}:{port:04X}")]
    mapped = b"\0" * 10 + b"\xff\xff" + ip.packed
    return [("tcp", f"{words(ip.packed)}:{port:04X}"), ("tcp6", f"{words(mapped)}:{port:04X}")]


def find_peer_socket(peer: tuple, ours: tuple) -> PeerSocket | None:
    """The socket at the other end of the connection from `peer` to `ours` (sockname tuples, as aiohttp's
    transport gives them), or None when it is not on this machine or already closed. The table is searched as text
    (a substring search, not a parse of each line), so it costs little however many connections are open."""
    peer_forms, our_forms = _proc_forms(peer[0], peer[1]), _proc_forms(ours[0], ours[1])
    for table in _TABLES:
        wanted = [
            f" {local} {remote} " for t, local in peer_forms if t == table for u, remote in our_forms if u == table
        ]
        if not wanted:
            continue
        try:
            text = (PROC / "net" / table).read_text()
        except OSError:
            continue
        for needle in wanted:
            at = text.find(needle)
            if at >= 0:
                line = text[text.rfind("\n", 0, at) + 1 : text.find("\n", at)]
                fields = line.split()
                return PeerSocket(inode=int(fields[9]), uid=int(fields[7]))
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a module started through a wrapper script runs as a child of it)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name in (...) may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    tree, index = [pid], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


def owner_among(inode: int, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the socket `inode` open, or None."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = list(os.scandir(PROC / str(pid) / "fd"))
        except OSError:  # ended, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path) == target:
                    return pid
            except OSError:
                continue
    return None
