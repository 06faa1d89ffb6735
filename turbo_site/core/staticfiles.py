"""/static/ over ASGI, from WhiteNoise's index of the files: no thread per request, no sync-only middleware.

WhiteNoise's own entry points are WSGI (``WhiteNoise``) or a sync-only Django middleware, and the ASGI
stack keeps every middleware async (turbo_site/tests/test_asgi.py). So this wraps the ASGI app and asks
WhiteNoise's middleware object only for what it decides: which file answers a path, and with which
headers (the compressed variant the client accepts, ETag and 304, ranges, and a ten-year immutable
``Cache-Control`` for the hashed names of ``CompressedManifestStaticFilesStorage``). The bytes are sent
here, read in a worker thread chunk by chunk.

With STATIC_ROOT set (production: ``collectstatic`` has run, see docs/deploying.md) the index is the
collected directory, built once at start. Without it (``make run``, the suite) the files are found in
the apps, as Django's development handler did, and re-read on every request under DEBUG.
"""

import asyncio

from whitenoise.middleware import WhiteNoiseMiddleware

CHUNK_BYTES = 64 * 1024


class StaticFiles:
    """ASGI: a GET or HEAD for a known static file is answered here; everything else goes to ``app``."""

    def __init__(self, app):
        self.app = app
        self.index = WhiteNoiseMiddleware(get_response=None)  # its __call__ (the sync path) is never used

    async def __call__(self, scope, receive, send):
        static_file = None
        if scope["type"] == "http" and scope["path"].startswith(self.index.static_prefix):
            if self.index.autorefresh:
                static_file = self.index.find_file(scope["path"])
            else:
                static_file = self.index.files.get(scope["path"])
        if static_file is None:
            return await self.app(scope, receive, send)
        request_headers = {
            "HTTP_" + name.decode("latin-1").upper().replace("-", "_"): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        response = static_file.get_response(scope["method"], request_headers)
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]
        await send({"type": "http.response.start", "status": int(response.status), "headers": headers})
        if response.file is None:
            return await send({"type": "http.response.body", "body": b""})
        try:
            while chunk := await asyncio.to_thread(response.file.read, CHUNK_BYTES):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.file.close()
