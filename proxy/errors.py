"""The one error a model call raises, whatever went wrong on the way (the floor under the model path,
with proxy.config: the gateway and usage both raise it)."""

from dataclasses import dataclass, replace

from proxy.config import text_redact
from turbo_site.core.errors import Outcome, TurboError


@dataclass(frozen=True)
class Attempt:
    """One deployment tried for a request, and why it failed ("" if it answered)."""

    deployment: str
    error: str = ""


class GatewayError(TurboError):
    """A model call failed; `status` says how, as an HTTP status.

    502: no upstream could be reached or an answer broke off; 504: too slow; 503: nothing configured or
    every upstream busy; 404/403: an unknown or forbidden model; otherwise the upstream's own status.
    `code` and `error_type` follow OpenAI's error shape. The message never holds a key (see redact).
    A TurboError: every front answers it through turbo_site.core.errors.outcome_of.
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
            message = text_redact(message)
        super().__init__(message, code=code, headers=headers)  # headers: a rate limit's x-ratelimit-*
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after
        self.attempts = attempts
        self.is_logged = False  # the gateway logged it already, naming the deployment: no front logs it again

    @property
    def status_code(self) -> int:
        return self.status

    def outcome(self) -> Outcome:
        """An upstream's own failure is `upstream_error`: 502 (504 if it was too slow), but an upstream's
        400/403/404 keeps its status (the request was refused as asked). Turbo's own codes keep theirs."""
        outcome = super().outcome()
        if self.code == "upstream_error" and self.status not in (400, 403, 404):
            return replace(outcome, status=504 if self.status == 504 else 502, error_type="server_error")
        return outcome
