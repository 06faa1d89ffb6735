"""A multipart form's text fields, read without the files: what policy (proxy.requests) and budgets
(proxy.usage.budgets) need of an upload. Apart from proxy.requests, whose chat reading imports the
gateway's call path, which stands on usage.
"""

import re
from email.message import Message
from email.utils import collapse_rfc2231_value

# A multipart form's text fields that policy and pricing read (the files are left alone).
FORM_FIELDS = ("model", "n", "size", "quality")
_PART_END = re.compile(rb"\r?\n\r?\n")


def media_type_of(content_type: str) -> tuple[str, Message]:
    """The media type of a Content-Type header ("application/octet-stream" if none), and the header."""
    header = Message()
    header["content-type"] = content_type or "application/octet-stream"
    return header.get_content_type(), header


def form_fields(body: bytes, content_type: str) -> dict[str, str] | None:
    """The text fields `FORM_FIELDS` of a `multipart/form-data` body (None: not a form one can read).
    A field given twice makes the form unreadable: policy and upstream might each take another."""
    _, header = media_type_of(content_type)
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        return None
    # A delimiter starts a line (RFC 2046 5.1.1); text inside a file that merely contains it does not count.
    parts = re.split(rb"\r?\n--" + re.escape(boundary.encode("latin-1")), b"\r\n" + body)
    if len(parts) < 3:
        return None
    fields: dict[str, str] = {}
    for part in parts[1:-1]:
        split = _PART_END.search(part)
        if split is None:
            return None
        head = Message()
        for line in part[: split.start()].decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if colon:
                head[name.strip()] = value.strip()
        name = head.get_param("name", header="content-disposition")
        if name is None:
            continue
        name = collapse_rfc2231_value(name).lower()
        if name not in FORM_FIELDS:
            continue
        if name in fields:
            return None
        try:
            fields[name] = part[split.end() :].decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    return fields
