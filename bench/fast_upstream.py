"""A minimal, fast fake OpenAI upstream: a raw ASGI app served by uvicorn in its own process.

    python -m bench.fast_upstream --port 9100 [--latency-ms 5] [--chunks 20] [--chunk-gap-ms 2]

GET /v1/models answers at once. POST /v1/chat/completions waits `latency-ms`, then answers with a fixed
completion, or with `"stream": true` sends `chunks` server-sent events `chunk-gap-ms` apart. Each
streamed chunk carries its send time as `t=<time.time_ns()>` in the delta content, so a client on the
same machine can tell how long the chunk took to reach it. The last event before `[DONE]` carries usage,
as OpenAI's does with `stream_options.include_usage`, so the proxy's usage reader does its real work.
"""

import argparse
import asyncio
import importlib.util
import json
import time

import uvicorn

MODELS = json.dumps(
    {"object": "list", "data": [{"id": "bench-model", "object": "model", "created": 0, "owned_by": "bench"}]}
).encode()
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
).encode()
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}'
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
# Chunk JSON around the timestamp, built once: only the number changes per chunk.
CHUNK_HEAD = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"bench-model",'
CHUNK_HEAD += b'"choices":[{"index":0,"delta":{"content":"t='
CHUNK_TAIL = b'"},"finish_reason":null}]}\n\n'
LAST_CHUNK = (
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": USAGE,
        }
    ).encode()
    + b"\n\ndata: [DONE]\n\n"
)


def make_app(*, latency_ms: float, chunks: int, chunk_gap_ms: float):
    """The ASGI app, with its timings fixed."""
    latency = latency_ms / 1000
    gap = chunk_gap_ms / 1000

    async def read_body(receive) -> bytes:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                return body

    async def answer(send, status: int, body: bytes) -> None:
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def stream(send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        for index in range(chunks):
            if index:
                await asyncio.sleep(gap)
            chunk = CHUNK_HEAD + str(time.time_ns()).encode() + CHUNK_TAIL
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": LAST_CHUNK})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/")
        method = scope["method"]
        body = await read_body(receive)
        if method == "GET" and path == "/v1/models":
            await answer(send, 200, MODELS)
        elif method == "POST" and path == "/v1/chat/completions":
            try:
                is_stream = bool(json.loads(body or b"{}").get("stream"))
            except (ValueError, AttributeError):
                await answer(send, 400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
                return
            if latency:
                await asyncio.sleep(latency)
            if is_stream:
                await stream(send)
            else:
                await answer(send, 200, COMPLETION)
        else:
            await answer(send, 404, NOT_FOUND)

    return app


def fastest_server_parts() -> tuple[str, str]:
    """uvloop and httptools when installed (they are optional, not in requirements), else the defaults."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=5.0, help="wait before answering (default 5)")
    parser.add_argument("--chunks", type=int, default=20, help="streamed chunks per answer (default 20)")
    parser.add_argument("--chunk-gap-ms", type=float, default=2.0, help="pause between chunks (default 2)")
    args = parser.parse_args()
    loop, http = fastest_server_parts()
    app = make_app(latency_ms=args.latency_ms, chunks=args.chunks, chunk_gap_ms=args.chunk_gap_ms)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
