"""One process start: every entry point sets up the same instruments here, once.

    process_start("asgi")      # turbo_site/asgi.py, once Django is set up
    process_start("grpc")      # manage.py grpcserve
    process_start("command")   # the operator commands (core.commands.ActionCommand: programs run, upstreams check...)

It puts the secret-redacting filter on the servers' loggers, turns tracing on when
OTEL_EXPORTER_OTLP_ENDPOINT is set (the spans' resource says which kind of process sent them:
`turbo.process`), and loads the metrics (multiprocess mode when METRICS_MULTIPROC_DIR is set; the live
gauges of dead processes removed). Whatever ends the process exports the buffered spans: the ASGI
lifespan and grpcserve's stop (`tracing_shutdown`), the SDK's exit hook for a command.
"""

import logging

logger = logging.getLogger("turbo")

PROCESS_KINDS = ("asgi", "grpc", "command")
_started: str = ""  # the kind this process started as


def process_start(kind: str) -> bool:
    """Set up logging redaction, tracing and metrics for a process of `kind` (one of PROCESS_KINDS).
    Idempotent: the first call does the work (True), later ones nothing (False). Call after django.setup()."""
    global _started
    if kind not in PROCESS_KINDS:
        raise ValueError(f"process kind {kind!r} is not one of {', '.join(PROCESS_KINDS)}")
    if _started:
        return False
    _started = kind
    from turbo_site.core import metrics  # noqa: F401 - its import sets the multiprocess mode up
    from turbo_site.core.logs import log_redaction_install
    from turbo_site.core.tracing import tracing_setup

    log_redaction_install()
    tracing_setup(process=kind)
    return True
