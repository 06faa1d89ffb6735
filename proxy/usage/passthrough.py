"""Usage on the /v1 passthrough: asking a stream for its usage unseen, and recording what a call used.

A streamed chat completion (or completion) that did not ask for usage is sent upstream with
`stream_options.include_usage` set (`usage_asked_for`), and `UsageStripper` takes out of the bytes the
client gets exactly what that added: the usage-only chunk before `data: [DONE]`, a `usage` an upstream
put on a chunk with choices, and the `"usage": null` OpenAI then puts on every chunk. Only events that
contain `"usage"` are looked at; everything else goes through as it came. A client that asked for usage
gets the upstream's bytes untouched.
"""

import json
import re
from decimal import Decimal
from typing import TYPE_CHECKING

from proxy.usage.caller import Caller
from proxy.usage.pricing import price_of, units_cost
from proxy.usage.records import Estimate, Usage, usage_from, usage_record
from turbo_site.core.text import json_bytes

if TYPE_CHECKING:  # the gateway's call path stands on usage: its types only name what this reads
    from proxy.gateway.calls import UsageReader
    from proxy.gateway.dispatch import Answer

STREAMED_USAGE_PATHS = ("chat/completions", "completions")
# Paths whose answers are charged by their tokens even when the upstream gives no usage (counted offline).
GENERATIVE_PATHS = ("chat/completions", "completions", "responses", "embeddings", "moderations")
_USAGE_NULL = re.compile(rb'\s*,\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def usage_asked_for(path: str, payload: dict | None, body: bytes) -> tuple[dict, bytes] | None:
    """The payload and body to send when Turbo asks a stream for usage the client did not ask for;
    None when there is nothing to add (not a streamed completion, or the client asked itself)."""
    if payload is None or payload.get("stream") is not True or path.strip("/") not in STREAMED_USAGE_PATHS:
        return None
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if "stream_options" not in payload:
        # The common case: append the field to the client's bytes rather than dump the whole body again.
        trimmed = body.rstrip()
        if trimmed.endswith(b"}"):
            new_body = trimmed[:-1].rstrip() + b',"stream_options":{"include_usage":true}}'
            return {**payload, "stream_options": {"include_usage": True}}, new_body
    options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    asked = {**payload, "stream_options": options}
    return asked, json_bytes(asked)


class UsageStripper:
    """Takes the usage Turbo asked for out of a server-sent event stream, event by event.

    A partial event is held back until its end arrives (a client cannot act on half an event anyway).
    """

    def __init__(self):
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of the stream so far the client may have: whole events, usage removed."""
        data = self.pending + chunk if self.pending else chunk
        lf = data.rfind(b"\n\n")
        crlf = data.rfind(b"\r\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if not cut:
            self.pending = data
            return b""
        complete, self.pending = data[:cut], data[cut:]
        if b'"usage"' in complete:
            return self._strip(complete)
        return complete

    def finish(self) -> bytes:
        """The rest, as it stands (a stream that ended without closing its last event)."""
        rest, self.pending = self.pending, b""
        return self._strip(rest) if b'"usage"' in rest else rest

    def _strip(self, data: bytes) -> bytes:
        out = []
        position = 0
        for end in _EVENT_END.finditer(data):
            out.append(self._event(data[position : end.start()], end.group()))
            position = end.end()
        if position < len(data):
            out.append(self._event(data[position:], b""))
        return b"".join(out)

    @staticmethod
    def _event(event: bytes, separator: bytes) -> bytes:
        if b'"usage"' not in event:
            return event + separator
        event = _USAGE_NULL.sub(b"", event)
        if b'"usage"' not in event:
            return event + separator
        lines = event.split(b"\n")
        for index, line in enumerate(lines):
            if not line.startswith(b"data:") or b'"usage"' not in line:
                continue
            raw = line[5:].strip()
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(data, dict) or "usage" not in data:
                continue
            if not data.get("choices"):
                return b""  # the usage-only chunk Turbo asked for: the client never asked for it
            del data["usage"]
            compact = b'": ' not in raw and b'", "' not in raw
            dumped = json.dumps(
                data, ensure_ascii=raw.isascii(), separators=(",", ":") if compact else (", ", ": ")
            ).encode()
            ending = b"\r" if line.endswith(b"\r") else b""
            lines[index] = line[: len(line) - len(line[5:].lstrip())] + dumped + ending
        return b"\n".join(lines) + separator


def exchange_usage_record(
    *,
    caller: Caller | None,
    path: str,
    model: str,
    payload: dict | None,
    answer: "Answer",
    reader: "UsageReader",
    form: dict[str, str] | None = None,
    body_size: int = 0,
) -> Decimal | None:
    """Record a /v1 call's usage once its answer has ended (or broken off, or the client left): for
    images, speech and transcriptions what they made (`payload` or the multipart `form` says what was
    asked; `body_size`: the upload's), else the upstream's token counts when it gave them, else tokens
    counted offline from the request and what arrived."""
    if caller is None or answer.response.status >= 400:
        return Decimal(0)
    model = answer.model or model or reader.model
    deployment = answer.deployment.id
    usage = usage_from(reader.usage, model=model, deployment=deployment)
    price = price_of(model)
    units = units_cost(path, price, payload or form, body_size=body_size, usage=reader.usage) if price else None
    if units is not None:
        return usage_record(caller, usage or Usage(model, deployment), cost=units)
    if usage is not None:  # usage comes at the end: the answer was whole
        return usage_record(caller, usage, served_model=reader.model)
    if path.strip("/") not in GENERATIVE_PATHS:  # no usage, and no text to count: its input's tokens
        return usage_record(caller, Usage(model, deployment), estimate=Estimate(prompt=payload))
    kept = b"".join(reader.kept)
    estimate = Estimate(prompt=payload, scale=reader.size / len(kept) if kept else 1.0)
    if reader.is_event_stream:
        estimate.stream = kept
    else:
        estimate.body = kept
    return usage_record(caller, Usage(model, deployment), estimate=estimate, served_model=reader.model)
