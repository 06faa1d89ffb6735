"""Body parsers."""

import json

from django.http import QueryDict
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser


class LenientFormParser(FormParser):
    """A form parser that also takes a JSON object sent with curl's default form content type.

    The seed's own examples (`curl -XPOST /user/logout -d '{"token": "..."}'`) send JSON labelled
    `application/x-www-form-urlencoded`; a body that starts with `{` is therefore read as JSON.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", "utf-8")
        raw = stream.read() if stream is not None else b""
        if raw.lstrip().startswith(b"{"):
            try:
                data = json.loads(raw.decode(encoding))
            except (UnicodeDecodeError, ValueError) as exc:
                raise ParseError(f"JSON parse error - {exc}") from exc
            if not isinstance(data, dict):
                raise ParseError("the body must be a JSON object")
            return data
        try:
            return QueryDict(raw, encoding=encoding)
        except UnicodeDecodeError as exc:
            raise ParseError("the form body is not valid UTF-8") from exc
