"""Log hygiene: no secret query parameter (a live `?token=`) reaches a log line, and no value a
handler cannot write (a lone surrogate, a NUL, a 10 MB string)."""

import logging

from turbo_site.core.http import redact_query
from turbo_site.core.text import LOG_VALUE_MAX, storable

# The servers' own loggers: uvicorn logs every WebSocket handshake with its query string at INFO, even
# with --no-access-log. A filter on a logger sees only what is logged on that logger, so each is named.
SERVER_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "daphne",
    "daphne.server",
    "daphne.http_protocol",
    "daphne.ws_protocol",
    "django.channels.server",
    "django.server",
)


def _clean(value, limit: int | None = LOG_VALUE_MAX):
    return redact_query(storable(value, limit)) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites a record's message with secret query parameters redacted and its text made storable;
    never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The arguments are redacted one by one, not the formatted message: uvicorn's access formatter
        # unpacks record.args itself.
        if isinstance(record.msg, str):
            record.msg = _clean(record.msg, None)  # the code's own format string: kept whole
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


def log_redaction_install() -> None:
    """Put RedactSecrets on the servers' loggers (idempotent); asgi.py calls it once Django is set up."""
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
            logger.addFilter(RedactSecrets())
