"""Text every store and exporter accepts: the one helper values pass through before they are written.

Postgres refuses U+0000 in text (SQLite stores it: the two must not differ); a lone surrogate
("\\ud800", which JSON's escapes can carry) has no UTF-8, so the database driver, prometheus-client's
exposition, the OTLP exporter and a log handler each raise on it, usually long after the request that
brought it (a scrape, a batch of other requests' spans); an over-long value costs every reader.
Whatever a client sent goes through `storable()` where it becomes a column, a label, an attribute or
a log argument.
"""

import json
from typing import Any

# Log arguments longer than this are cut: one line must not carry a 10 MB body.
LOG_VALUE_MAX = 4096


def storable(value: Any, limit: int | None = None) -> str:
    """`value` as text any store accepts: no NUL, lone surrogates as "?", at most `limit` characters.

    None is "" (a missing value), anything else not a str is str()-ed. Cut before it is cleaned,
    so a 10 MB string costs no more than `limit` characters of work.
    """
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if limit is not None and len(text) > limit:
        text = text[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def storable_value(value: Any, limit: int | None = None) -> Any:
    """A span attribute or label value made storable: strings (also inside a list or tuple) cleaned,
    numbers and booleans as they are."""
    if isinstance(value, str):
        return storable(value, limit)
    if isinstance(value, list | tuple):
        return [storable_value(item, limit) for item in value]
    return value


def json_bytes(value: Any) -> bytes:
    """`value` as UTF-8 JSON for an upstream; a lone surrogate a client sent (JSON's "\\ud800") goes on
    escaped, as the client wrote it, instead of failing the request."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


def unstorable_text(value: Any) -> str | None:
    """What in a JSON value a store refuses, said for a 400 ("a NUL character", "an unpaired surrogate"), or
    None: its strings, keys included, are checked (Postgres's jsonb refuses U+0000; no UTF-8 holds a lone
    surrogate). For what a client asks to be kept as given (a chat's settings, a program's context, a
    response format), where cleaning it (storable_json) would change what was asked."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a NUL character (U+0000)"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "an unpaired surrogate character"
    return None


def storable_json(value: Any) -> Any:
    """A JSON value (a model's tool calls, a structured reply) with every string in it, keys included,
    made storable (Postgres's jsonb refuses U+0000 as its text columns do)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(key): storable_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(item) for item in value]
    return value
