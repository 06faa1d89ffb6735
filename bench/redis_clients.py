"""Which of Redis's clients belong to one process: its CLIENT LIST entries whose port is a socket of it.

Linux only (/proc). Used by bench.listeners and chats/tests/test_stream_listeners.py to check that a
Turbo process holds few Redis connections however many subscribers it serves.

The sockets to Redis are found with `ss`, which filters by the Redis port in the kernel: reading
/proc/net/tcp instead walks every socket of the machine, and with the benchmark's 20,000 open it took
a few hundred milliseconds of CPU per look (the load generator, which sampled every 0.2 s on its own
event loop, then delivered every frame that much late).
"""

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

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


def _sockets_to(port: int) -> list[tuple[int, str]]:
    """(local port, inode) of every established TCP socket whose peer port is `port`."""
    if shutil.which("ss") is not None:
        shown = subprocess.run(
            ["ss", "-tnHe", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
        ).stdout
        sockets = []
        for line in shown.splitlines():
            fields = line.split()
            inode = next((field[4:] for field in fields if field.startswith("ino:")), None)
            if inode is not None:
                sockets.append((int(fields[2].rsplit(":", 1)[1]), inode))
        return sockets
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                sockets.append((int(fields[1].rsplit(":", 1)[1], 16), fields[9]))
    return sockets


def redis_clients_of(pid: int, redis_address: str) -> list[dict]:
    """The CLIENT LIST entries of the Redis at `redis_address` that are sockets of process `pid`."""
    inodes = _socket_inodes(pid)
    ports = {port for port, inode in _sockets_to(urlsplit(redis_address).port or 6379) if inode in inodes}
    with redis.Redis.from_url(redis_address) as client:
        clients = client.client_list()
    return [client for client in clients if int(client["addr"].rsplit(":", 1)[1]) in ports]


def redis_connections_of(pid: int, redis_address: str) -> int:
    """How many connections process `pid` holds to the Redis at `redis_address`."""
    return len(redis_clients_of(pid, redis_address))


def _watch() -> None:
    """`python -m bench.redis_clients REDIS_URL PID...`: sample every second until stdin closes, then
    print the most connections seen per process (a JSON list): the benchmark's sampler, in a process
    of its own so that its work does not hold up the benchmark's event loop."""
    import json
    import sys
    import threading

    address, pids = sys.argv[1], [int(pid) for pid in sys.argv[2:]]
    most = [0] * len(pids)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        for index, pid in enumerate(pids):
            most[index] = max(most[index], redis_connections_of(pid, address))
        # Once a second: each look lists every socket of each process (thousands here) and starts `ss`, and at
        # 0.2 s the sampler spent about as much CPU as a Turbo process while the chats streamed (4 s in a
        # 43 s phase, on a loaded 2-core machine). Pools keep their connections, so a peak stays visible.
        stop.wait(1.0)
    print(json.dumps(most), flush=True)


if __name__ == "__main__":
    _watch()
