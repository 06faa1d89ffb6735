"""Many chats at once over two server processes (Postgres + Redis): every subscriber gets every event.

10 group chats of 20 members each; every member subscribes to its chat (half over SSE, half over
WebSocket, spread over both processes), then 50 streamed prompts (5 per chat) go to both processes
at once; the fake upstream holds every reply after its first word until all 50 have started, so that
they really stream together. Each of the 200 subscribers must see, for every prompt of its chat,
every delta exactly once and in order, then exactly one `message.completed` carrying the whole
reply; its seqs must go up by one with no hole, and no `stream.gap` / `stream.error` (or any other
notice) may come. The replies must be saved as streamed.

All 200 subscribers live in this process on one event loop (httpx streaming for SSE, websockets'
asyncio client for WebSocket). Every wait is bounded; nothing is asserted about wall-clock times.
"""

import asyncio
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import pytest
from django.conf import settings
from django.db import connection
from websockets.asyncio.client import connect

from chats.tests.conftest import Server

pytestmark = [
    pytest.mark.django_db(transaction=True),
    # Only a shared database and stream store can join two processes; the in-memory leg has neither.
    pytest.mark.skipif(
        not settings.REDIS_ADDRESS or connection.vendor != "postgresql",
        reason="needs DB_ADDRESS=postgresql://... and REDIS_ADDRESS",
    ),
]

CHATS = 10
MEMBERS = 20  # per chat: the owner and 19 members of its group
PROMPTS = 5  # per chat
WORDS = 20  # per reply
CHUNK_DELAY = 0.01  # seconds between the fake upstream's chunks
AT_ONCE = 20  # signups and handshakes in flight
SETTLE_SECONDS = 0.5  # after the last final event: time for a duplicate to show up
FINAL_TYPES = ("message.completed", "message.failed")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def post(http: httpx.AsyncClient, url: str, token: str | None = None, **data) -> dict:
    response = await http.post(url, data=data, headers=bearer(token) if token else None)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:500]}"
    return response.json()


@dataclass
class Subscriber:
    """One member's stream of one chat, and everything it received."""

    index: int
    kind: str  # "sse" or "ws"
    chat: int
    chat_id: str
    address: str
    token: str
    events: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    finals: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"subscriber {self.index} ({self.kind}, chat {self.chat}, {self.address})"

    def received(self, event: dict, sse_id: int | None = None) -> None:
        if "seq" not in event:
            self.problems.append(f"notice: {event}")
        elif self.kind == "sse" and sse_id != event["seq"]:
            self.problems.append(f"SSE id {sse_id} for seq {event['seq']}")
        self.events.append(event)
        if event.get("type") in FINAL_TYPES:
            self.finals += 1
            if self.finals >= PROMPTS:
                self.finished.set()

    async def run(self, http: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
        try:
            if self.kind == "sse":
                await self._sse(http, gate)
            else:
                await self._ws(gate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.ready.set()  # nobody waits for a subscriber that has failed
            self.finished.set()

    async def _sse(self, http: httpx.AsyncClient, gate: asyncio.Semaphore) -> None:
        await gate.acquire()
        held = True
        try:
            url = f"http://{self.address}/chat/stream"
            async with http.stream("GET", url, params={"id": self.chat_id}, headers=bearer(self.token)) as response:
                if response.status_code != 200:
                    self.problems.append(f"SSE answered {response.status_code}: {(await response.aread())[:300]}")
                    return
                sse_id, data = None, []
                async for line in response.aiter_lines():
                    if not line:
                        if data:
                            self.received(json.loads("\n".join(data)), sse_id)
                        sse_id, data = None, []
                    elif line.startswith("retry:"):  # the first line: subscribed
                        if held:
                            gate.release()
                            held = False
                        self.ready.set()
                    elif line.startswith("id:"):
                        sse_id = int(line[3:].strip())
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
            self.problems.append("the SSE stream ended")
        finally:
            if held:
                gate.release()

    async def _ws(self, gate: asyncio.Semaphore) -> None:
        url = f"ws://{self.address}/chat/stream?id={self.chat_id}&token={self.token}"
        async with gate:
            ws = await connect(
                url, origin=f"http://{self.address}", open_timeout=30, ping_interval=None, max_size=None, proxy=None
            )
        self.ready.set()  # the server subscribes before it accepts the handshake
        try:
            async for frame in ws:
                self.received(json.loads(frame))
            self.problems.append(f"the socket closed: {ws.close_code} {ws.close_reason}")
        finally:
            await asyncio.wait_for(ws.close(), 5)


def check(subscriber: Subscriber, expected: dict[str, str]) -> list[str]:
    """What is wrong with what one subscriber received; `expected`: message id -> reply, for its chat."""
    problems = list(subscriber.problems)
    seqs = [event["seq"] for event in subscriber.events if "seq" in event]
    holes = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1]
    if holes:
        problems.append(f"seqs not consecutive: {holes[:5]} ({len(holes)} in all)")
    by_message: dict[str, list[dict]] = defaultdict(list)
    for event in subscriber.events:
        if event.get("chat_id") not in (None, subscriber.chat_id):
            problems.append(f"an event of another chat: {event}")
        elif event.get("type", "").startswith("message."):
            by_message[str(event["message"]["id"])].append(event)
    unexpected = by_message.keys() - expected.keys()
    if unexpected:
        problems.append(f"events of unknown messages: {sorted(unexpected)}")
    for message_id, text in expected.items():
        events = by_message.get(message_id, [])
        types = [event["type"] for event in events]
        deltas = [event for event in events if event["type"] == "message.delta"]
        finals = [event for event in events if event["type"] in FINAL_TYPES]
        joined = "".join(event["delta"] for event in deltas)
        if joined != text:
            problems.append(f"message {message_id}: deltas joined are {joined!r}, not {text!r}")
        replies = [event["message"]["reply"] for event in deltas]
        so_far = [text[: len(reply)] for reply in replies]
        if replies != so_far or [len(r) for r in replies] != sorted(len(r) for r in replies):
            problems.append(f"message {message_id}: the reply so far does not grow in order: {replies}")
        if types.count("message.created") != 1 or types[:1] != ["message.created"]:
            problems.append(f"message {message_id}: not one message.created first: {types}")
        if len(finals) != 1 or types[-1:] != ["message.completed"]:
            problems.append(f"message {message_id}: not one message.completed last: {types}")
        elif (finals[0]["message"]["reply"], finals[0]["message"]["status"]) != (text, "complete"):
            problems.append(f"message {message_id}: the final event says {finals[0]['message']}")
    return problems


async def scenario(servers: list[Server], upstream) -> list[str]:
    """Sets the chats up, subscribes, prompts; returns every problem found (empty: all delivered)."""
    addresses = [server.address for server in servers]
    # Idle connections are dropped well before uvicorn's keep-alive timeout (5 s) closes them: reusing one
    # just as the server closes it fails the request (httpx's default expiry is that same 5 s).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1)
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30, connect=10), limits=limits, trust_env=False) as http,
        httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10), limits=limits, trust_env=False) as sse,
    ):
        gate = asyncio.Semaphore(AT_ONCE)

        async def signup(index: int) -> dict:
            async with gate:
                address = addresses[index % 2]
                body = await post(
                    http,
                    f"http://{address}/user/signup",
                    username=f"load-{index}-{os.urandom(4).hex()}",
                    password="pw-123456",
                )
            return {"token": body["token"], "id": body["user"]["id"]}

        users = await asyncio.wait_for(asyncio.gather(*(signup(i) for i in range(CHATS * MEMBERS))), 60)
        members = [users[chat * MEMBERS : (chat + 1) * MEMBERS] for chat in range(CHATS)]

        async def make_chat(chat: int) -> str:
            async with gate:
                base = f"http://{addresses[chat % 2]}"
                owner = members[chat][0]["token"]
                group = await post(http, f"{base}/group/create", owner, name=f"load {chat}")
                others = ",".join(str(member["id"]) for member in members[chat][1:])
                await post(http, f"{base}/group/members/add", owner, id=group["id"], user_ids=others)
                made = await post(http, f"{base}/chat/create", owner, name=f"load {chat}", group_id=group["id"])
            return str(made["id"])

        chat_ids = await asyncio.wait_for(asyncio.gather(*(make_chat(chat) for chat in range(CHATS))), 60)

        # Per chat: members alternate SSE / WebSocket, and each pair alternates between the processes.
        subscribers = [
            Subscriber(
                index=chat * MEMBERS + member,
                kind="sse" if member % 2 == 0 else "ws",
                chat=chat,
                chat_id=chat_ids[chat],
                address=addresses[(chat + member // 2) % 2],
                token=members[chat][member]["token"],
            )
            for chat in range(CHATS)
            for member in range(MEMBERS)
        ]
        tasks = [asyncio.create_task(subscriber.run(sse, gate)) for subscriber in subscribers]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subscribers)), 60)
            failed = [f"{s.name}: {s.problems}" for s in subscribers if s.problems]
            assert not failed, "subscribers failed to connect:\n" + "\n".join(failed[:20])

            texts = {
                (chat, prompt): " ".join(f"c{chat}p{prompt}w{word}" for word in range(WORDS))
                for chat in range(CHATS)
                for prompt in range(PROMPTS)
            }

            async def send(chat: int, prompt: int) -> tuple[int, str, str]:
                address = addresses[(chat + prompt) % 2]
                author = members[chat][prompt]["token"]  # any member may prompt
                text = texts[chat, prompt]
                body = await post(
                    http,
                    f"http://{address}/chat/prompt",
                    author,
                    id=chat_ids[chat],
                    prompt=f"[scenario:gated][chunk_delay:{CHUNK_DELAY}] echo: {text}",
                    stream="true",
                )
                assert body["message"]["status"] == "streaming", body
                return chat, str(body["message"]["id"]), text

            sent = await asyncio.wait_for(asyncio.gather(*(send(chat, prompt) for chat, prompt in texts)), 60)
            expected: dict[int, dict[str, str]] = defaultdict(dict)
            for chat, message_id, text in sent:
                expected[chat][message_id] = text
            # Every reply has sent its first word and waits at the gate: let all 50 stream at once.
            deadline = time.monotonic() + 30
            while sum(r.path == "/v1/chat/completions" for r in list(upstream.requests)) < len(texts):
                assert time.monotonic() < deadline, f"the upstream got {len(upstream.requests)} requests"
                await asyncio.sleep(0.05)
            upstream.release()

            try:
                await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in subscribers)), 60)
            except TimeoutError:
                pass  # the checks below say who is missing what
            await asyncio.sleep(SETTLE_SECONDS)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=15)

        problems = []
        for subscriber in subscribers:
            problems += [f"{subscriber.name}: {p}" for p in check(subscriber, expected[subscriber.chat])]

        # And the replies were saved, as streamed.
        for chat in range(CHATS):
            read = await post(
                http, f"http://{addresses[chat % 2]}/chat/read", members[chat][0]["token"], id=chat_ids[chat]
            )
            saved = {str(m["id"]): (m["reply"], m["status"]) for m in read["messages"]}
            for message_id, text in expected[chat].items():
                if saved.get(message_id) != (text, "complete"):
                    problems.append(f"chat {chat}: message {message_id} saved as {saved.get(message_id)}")
        return problems


def test_many_chats_many_subscribers_get_every_event_once_in_order(two_servers, upstream):
    problems = asyncio.run(scenario(two_servers, upstream))
    logs = "\n".join(f"--- server {s.address} log:\n{s.log_tail()}" for s in two_servers)
    assert not problems, f"{len(problems)} problems; the first:\n" + "\n".join(problems[:30]) + "\n" + logs
    for server in two_servers:
        assert server.process.poll() is None, f"server {server.address} died:\n{server.log_tail()}"
        assert "Traceback" not in server.log.read_text(errors="replace"), server.log_tail()
