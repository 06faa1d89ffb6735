"""What of an upstream's answer may reach a client: no header but the allowed ones, no configured key.

Every call upstream carries the server's key, and an upstream may quote it back: in a header (a debug
header, `WWW-Authenticate`), in an error body ("Incorrect API key provided: sk-..."), in an error event
in the middle of a stream. The passthrough (proxy.views) sends the answer on through these.
"""

import re
import zlib

from turbo_site.core.http import REDACTED, holds_key

# Upstream response headers a client gets; any other (hop-by-hop, framing, cookies, CORS, security
# headers, server and debug headers) stays here. README's "/v1 passthrough" section lists them.
ALLOWED_RESPONSE_HEADERS = {
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "etag",
    "last-modified",
    "retry-after",
    "retry-after-ms",
    "x-request-id",
    "request-id",
}
ALLOWED_RESPONSE_PREFIXES = ("openai-", "x-ratelimit-")
# Whose account the server's key bills: the server's business, not a client's.
SERVER_ONLY_RESPONSE_HEADERS = {"openai-organization", "openai-project"}
# Content codings an error body is decoded from (to take keys out of it); others are not passed on.
READABLE_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def response_headers_allowed(upstream_headers: list[tuple[str, str]], secrets: list[str]) -> dict[str, str]:
    """The upstream's headers (lower-case names) a client may see: allowed by name, and holding no key."""
    return {
        name: value
        for name, value in upstream_headers
        if (name in ALLOWED_RESPONSE_HEADERS or name.startswith(ALLOWED_RESPONSE_PREFIXES))
        and name not in SERVER_ONLY_RESPONSE_HEADERS
        and not holds_key(value, *secrets)
    }


def encoding_readable(encoding: str) -> bool:
    """Can an error body in this content coding be decoded (to take keys out of it)?"""
    encoding = encoding.strip().lower()
    return not encoding or encoding == "identity" or encoding in READABLE_ENCODINGS


def error_body_decoded(body: bytes, encoding: str, limit: int) -> bytes | None:
    """An error body without its content coding (at most `limit` bytes), or None if it cannot be
    read: an unknown coding, or a broken stream."""
    if not encoding_readable(encoding):
        return None
    encoding = encoding.strip().lower()
    window = READABLE_ENCODINGS.get(encoding)
    if window is None:
        return body
    try:
        decoder = zlib.decompressobj(window)
        return decoder.decompress(body, limit)
    except zlib.error:
        if encoding != "deflate":
            return None
    try:  # "deflate" without its zlib header, as some servers send it
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, limit)
    except zlib.error:
        return None


# The end of a server-sent event: a blank line, in any of the line endings the format allows.
_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_KEY_LIKE = re.compile(rb"\bsk-[A-Za-z0-9_*.\-]{3,}")
_ERROR_EVENT = re.compile(rb'(?m)^(?:event:\s*error\s*$|data:\s*\{\s*"error")')


def _last_event_end(data: bytes, start: int) -> int:
    """Where the last whole event in `data` ends (0: none ends at or after `start`)."""
    cut = 0
    for end in _EVENT_ENDS:
        found = data.rfind(end, start)
        if found >= 0:
            cut = max(cut, found + len(end))
    return cut


class EventStreamRedactor:
    """Takes keys out of a server-sent event stream, whole events at a time, so that a key split
    between two chunks is found.

    A configured key is taken out of any event; anything key-like (`sk-...`) out of error events
    only (`event: error`, or data that is an `{"error": ...}` object): a model's reply may well quote
    an example key. A partial event is held back until its end arrives (a client cannot act on half an
    event anyway), up to `hold_max` bytes, past which all but a key's length is let go.
    """

    def __init__(self, secrets: list[str], *, hold_max: int = 1024 * 1024):
        self.secrets = [secret.encode() for secret in secrets if secret]
        self.tail = max((len(secret) for secret in self.secrets), default=0) + 64
        self.hold_max = max(hold_max, self.tail * 2)
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream so far the client may have: whole events, keys taken out."""
        data = self.pending + chunk if self.pending else chunk
        cut = _last_event_end(data, max(len(self.pending) - 3, 0))
        if not cut and len(data) > self.hold_max:
            # One huge event: redacted whole, then let go of all but its tail, where a key that has not
            # fully arrived yet may begin.
            data = self._redacted(data)
            cut = len(data) - self.tail
            self.pending = data[cut:]
            return data[:cut]
        if not cut:
            self.pending = data
            return b""
        complete, self.pending = data[:cut], data[cut:]
        return self._redacted(complete)

    def finish(self) -> bytes:
        """The rest, as it stands (a stream that ended without closing its last event)."""
        rest, self.pending = self.pending, b""
        return self._redacted(rest)

    def _redacted(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, REDACTED.encode())
        if b"sk-" not in data or not _ERROR_EVENT.search(data):
            return data  # the common case: nothing to look at event by event
        out = []
        position = 0
        for end in [*_EVENT_END.finditer(data), None]:
            stop = end.end() if end is not None else len(data)
            event = data[position:stop]
            if b"sk-" in event and _ERROR_EVENT.search(event):
                event = _KEY_LIKE.sub(REDACTED.encode(), event)
            out.append(event)
            position = stop
        return b"".join(out)
