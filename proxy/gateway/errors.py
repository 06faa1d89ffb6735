"""The one error a model call raises, whatever went wrong on the way."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """One deployment tried for a request, and why it failed ("" if it answered)."""

    deployment: str
    error: str = ""


class GatewayError(Exception):
    """A model call failed; `status` says how, as an HTTP status.

    502: no upstream could be reached or an answer broke off; 504: too slow; 503: nothing configured or
    every upstream busy; 404/403: an unknown or forbidden model; otherwise the upstream's own status.
    `code` and `error_type` follow OpenAI's error shape. The message never holds a key (see redact).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        code: str = "upstream_error",
        error_type: str = "server_error",
        retry_after: float | None = None,
        attempts: tuple[Attempt, ...] = (),
        redact: bool = True,
        headers: dict[str, str] | None = None,
    ):
        if redact:
            from proxy.gateway.routing import text_redact

            message = text_redact(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.error_type = error_type
        self.retry_after = retry_after
        self.attempts = attempts
        self.headers = headers or {}  # to answer with (a rate limit's x-ratelimit-*)
