"""The gRPC side of the one error outcome: an error becomes a gRPC status whose details are its message.

`turbo_site.core.errors.outcome_of` decides what a failure means (and logs an unexpected one); the
code's gRPC status comes from the same table as its HTTP status (errors.CODES, errors.GRPC_OF_STATUS).
A Retry-After travels as `retry-after` (seconds) in the trailing metadata.
"""

import grpc

from turbo_site.core.errors import GRPC_OF_STATUS, outcome_of

STATUS_CODES = {status: grpc.StatusCode[name] for status, name in GRPC_OF_STATUS.items()}
# HTTP statuses for the event log, the other way round (what a gRPC failure counts as).
HTTP_STATUSES = {code: status for status, code in reversed(STATUS_CODES.items())} | {
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.CANCELLED: 499,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, details, trailing metadata) for an error raised under a gRPC handler."""
    outcome = outcome_of(exc)
    trailing = (("retry-after", str(outcome.retry_after)),) if outcome.retry_after else ()
    return grpc.StatusCode[outcome.grpc_name], outcome.message, trailing
