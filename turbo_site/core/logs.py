"""Log hygiene: no secret query parameter (a live `?token=`) reaches a log line."""

import logging

from turbo_site.core.http import redact_query

# The servers' own loggers: uvicorn logs every WebSocket handshake with its query string at INFO, even
# with --no-access-log. A filter on a logger sees only what is logged on that logger, so each is named.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "daphne", "django.channels.server")


class RedactSecrets(logging.Filter):
    """Rewrites a record's message with secret query parameters redacted; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The arguments are redacted one by one, not the formatted message: uvicorn's access formatter
        # unpacks record.args itself.
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def log_redaction_install() -> None:
    """Put RedactSecrets on the servers' loggers (idempotent); asgi.py calls it once Django is set up."""
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
            logger.addFilter(RedactSecrets())
