"""WebSocket subscribers for the fan-out benchmark: one socket per chat member, all in this one process.

    python -m bench.fanout_subscribers   (driven by bench.fanout through stdin and stdout)

The first line on stdin is the configuration, JSON `{"url", "origin", "tokens": [...]}` (on stdin, so
that no token shows in a process list). It opens one socket per token on `<url>&token=<token>` (the
chat's `/chat/stream`), sending `origin` as the Origin header, and answers one line
`{"type": "ready", "connected", "failed", "compression"}` on stdout.

Each frame is stamped with `time.time_ns()` as soon as the socket hands it over and kept as it is:
nothing is parsed while a stream runs, so that the receiving side adds as little as it can. Then each
command line is answered with one JSON line:

- `{"cmd": "collect", "message_id", "timeout"}` waits until every open socket has seen that message's
  last event (`"partial": false`) or `timeout` seconds pass, then answers `{"type": "collected",
  "sockets": [...]}`: for each socket, in order, the deltas of that message as `[seq, delta,
  arrival_ns]`, the number of its events, whether its final event came (and that event's reply), how
  many frames of earlier collected messages arrived since (`late`) and, if it closed, why.
- `{"cmd": "quit"}` closes every socket and exits.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

FINAL_MARK = '"partial":false'  # the server writes compact JSON (separators "," and ":")
CONNECT_AT_ONCE = 10  # handshakes in flight; each costs the server a token lookup and an access query
collected_ids: set[str] = set()  # messages already reported: their frames arriving later count as late


class Socket:
    """One member's socket and what it received."""

    def __init__(self, index: int):
        self.index = index
        self.connection: ClientConnection | None = None
        self.frames: list[tuple[int, str]] = []  # (arrival_ns, text), in arrival order
        self.final_ids: set[str] = set()  # messages whose final event this socket has
        self.scanned = 0  # frames already checked for final events
        self.closed: str | None = None
        self.task: asyncio.Task | None = None

    def scan_finals(self) -> None:
        for _, text in self.frames[self.scanned :]:
            if FINAL_MARK in text:
                self.final_ids.add(str(json.loads(text).get("message", {}).get("id")))
        self.scanned = len(self.frames)


async def listen(socket: Socket, final_seen: asyncio.Event) -> None:
    """Keeps every frame with its arrival time until the socket closes."""
    frames = socket.frames
    try:
        async for frame in socket.connection:
            frames.append((time.time_ns(), frame))
            if FINAL_MARK in frame:
                final_seen.set()
    except ConnectionClosed:
        pass
    connection = socket.connection
    socket.closed = f"closed: code {connection.close_code} {connection.close_reason or ''}".strip()
    final_seen.set()


async def open_sockets(config: dict, final_seen: asyncio.Event) -> tuple[list[Socket], list[str]]:
    sockets = [Socket(index) for index in range(len(config["tokens"]))]
    failures: list[str] = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def open_one(socket: Socket, token: str) -> None:
        async with gate:
            try:
                socket.connection = await connect(
                    f"{config['url']}&token={token}",
                    origin=config["origin"],
                    proxy=None,
                    ping_interval=None,
                    open_timeout=60,
                    max_size=None,
                    max_queue=None,
                )
            except Exception as exc:  # any failure is reported, not raised
                socket.closed = f"connect failed: {type(exc).__name__}: {exc}"[:300]
                failures.append(f"socket {socket.index}: {socket.closed}")
                return
        socket.task = asyncio.create_task(listen(socket, final_seen))

    await asyncio.gather(*(open_one(s, t) for s, t in zip(sockets, config["tokens"], strict=True)))
    return sockets, failures


def take(socket: Socket, message_id: str, collected: set[str]) -> dict:
    """This message's frames out of the socket's buffer, as the report for it."""
    deltas, events, late, final_reply, kept = [], 0, 0, None, []
    for arrival, text in socket.frames:
        event = json.loads(text)
        event_message = str((event.get("message") or {}).get("id"))
        if event_message == message_id:
            events += 1
            if event.get("delta"):
                deltas.append([event.get("seq"), event["delta"], arrival])
            if event.get("partial") is False:
                final_reply = event["message"].get("reply")
        elif event_message in collected:
            late += 1
        else:
            kept.append((arrival, text))
    socket.frames[:] = kept
    socket.scanned = 0
    socket.final_ids.discard(message_id)
    return {
        "deltas": deltas,
        "events": events,
        "final": final_reply is not None,
        "final_reply": final_reply,
        "late": late,
        "closed": socket.closed,
    }


async def collect(sockets: list[Socket], final_seen: asyncio.Event, message_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        final_seen.clear()
        for socket in sockets:
            socket.scan_finals()
        waiting = [s for s in sockets if s.closed is None and message_id not in s.final_ids]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        try:
            await asyncio.wait_for(final_seen.wait(), timeout=left)
        except TimeoutError:
            pass
    return {"sockets": [take(socket, message_id, collected_ids) for socket in sockets]}


def answer(data: dict) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main() -> None:
    config = json.loads(await asyncio.to_thread(sys.stdin.readline))
    final_seen = asyncio.Event()
    sockets, failures = await open_sockets(config, final_seen)
    connected = [s.connection for s in sockets if s.connection is not None]
    compression = any(c.protocol.extensions for c in connected)
    answer({"type": "ready", "connected": len(connected), "failed": failures, "compression": compression})
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        if command.get("cmd") == "collect":
            message_id = str(command["message_id"])
            result = await collect(sockets, final_seen, message_id, float(command.get("timeout", 15)))
            collected_ids.add(message_id)
            answer({"type": "collected", "message_id": message_id, **result})
        elif command.get("cmd") == "quit":
            break
    await asyncio.gather(*(c.close() for c in connected), return_exceptions=True)
    await asyncio.gather(*(s.task for s in sockets if s.task), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
