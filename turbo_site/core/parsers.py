"""Body parsers, and the one way a client's JSON is read (bodies, WebSocket frames)."""

import json
import re

import orjson
from django.http import QueryDict
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser
from rest_framework.parsers import JSONParser as DrfJSONParser

# Deeper than any real request (OpenAI tool schemas nest a few dozen levels at most); Python's parser
# would raise RecursionError (a 500, or a dead socket) somewhere past a thousand.
MAX_JSON_DEPTH = 100

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
# orjson reads an integer past 64 bits as a float; json.loads keeps it an int.
_LONG_DIGITS = re.compile(rb"\d{20}")


class JSONTooDeep(ValueError):
    """The JSON nests deeper than MAX_JSON_DEPTH."""


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(raw: bytes, max_depth: int) -> None:
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # cannot nest deeper than it has brackets: the common case costs two scans in C
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', raw)):
        if bracket.group() in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep")
        else:
            depth -= 1


def client_json_loads(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON a client sent. Raises ValueError (JSONTooDeep for deep nesting) or UnicodeDecodeError.

    Use it wherever a client's body or frame is parsed: json.loads alone turns deep nesting into a
    RecursionError, and accepts NaN and Infinity, which are not JSON.
    """
    _check_depth(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw, max_depth)
    # orjson (C, a few times faster on a chat body) refuses NaN and Infinity too. What it refuses for
    # other reasons (UTF-16 or -32 bytes, a byte order mark, a lone surrogate escape, 1e999) and what
    # it would read otherwise (integers past 64 bits, as floats) go to the standard parser, so a body
    # reads exactly as json.loads read it.
    if isinstance(raw, bytes) and not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw, parse_constant=_refuse_constant)


def parse_refusal(exc: ValueError) -> Exception:
    """Why a client's JSON body was refused: nested too deeply is `invalid_json`, as /v1, /ws and GraphQL
    answer it (the front matrix checks they agree); anything else DRF's ParseError (`malformed_body`)."""
    if isinstance(exc, JSONTooDeep):
        from turbo_site.core.errors import Invalid

        return Invalid(str(exc), code="invalid_json")
    return ParseError(f"JSON parse error - {exc}")


class JSONParser(DrfJSONParser):
    """DRF's JSON parser over client_json_loads."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", "utf-8")
        raw = stream.read() if stream is not None else b""
        try:
            return client_json_loads(raw.decode(encoding))
        except (UnicodeDecodeError, ValueError) as exc:
            raise parse_refusal(exc) from exc


class LenientFormParser(FormParser):
    """A form parser that also takes a JSON object sent with curl's default form content type.

    The API's documented examples (`curl -XPOST /user/logout -d '{"token": "..."}'`) send JSON labelled
    `application/x-www-form-urlencoded`; a body that starts with `{` is therefore read as JSON.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", "utf-8")
        raw = stream.read() if stream is not None else b""
        if raw.lstrip().startswith(b"{"):
            try:
                data = client_json_loads(raw.decode(encoding))
            except (UnicodeDecodeError, ValueError) as exc:
                raise parse_refusal(exc) from exc
            if not isinstance(data, dict):
                raise ParseError("the body must be a JSON object")
            return data
        try:
            return QueryDict(raw, encoding=encoding)
        except UnicodeDecodeError as exc:
            raise ParseError("the form body is not valid UTF-8") from exc
