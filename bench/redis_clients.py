"""Which of Redis's clients belong to one process: its CLIENT LIST entries whose port is a socket of it.

Linux only (/proc). Used by bench.listeners and chats/tests/test_stream_listeners.py to check that a
Turbo process holds few Redis connections however many subscribers it serves.
"""

import os
from pathlib import Path

import redis


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process `pid` holds (from /proc)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_clients_of(pid: int, redis_address: str) -> list[dict]:
    """The CLIENT LIST entries of the Redis at `redis_address` that are sockets of process `pid`."""
    ports = _local_ports(pid)
    with redis.Redis.from_url(redis_address) as client:
        clients = client.client_list()
    return [client for client in clients if int(client["addr"].rsplit(":", 1)[1]) in ports]


def redis_connections_of(pid: int, redis_address: str) -> int:
    """How many connections process `pid` holds to the Redis at `redis_address`."""
    return len(redis_clients_of(pid, redis_address))
