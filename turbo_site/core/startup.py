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

import gc
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


# CPython collects its youngest generation every 700 net allocations of container objects. A proxied
# request leaves about 44 (bench/README.md, "the proxy's tail"): one request in 16 waited for a young
# collection and one in 180 for a middle one, so at c=1 the pauses sat inside the p99. Ten times the
# threshold puts them at one request in 160 and in 1,600, out of the p99; each young collection walks
# what survived since the last one, so it is longer, but it lands outside the percentiles that count.
GC_THRESHOLDS = (7000, 10, 10)


_heap_frozen = False


def heap_freeze() -> bool:
    """Once the server has started (the ASGI lifespan's startup): what exists by now lives as long as the
    process, so it goes out of the collector's sight (`gc.freeze()`: the full collections, the longest
    pauses, no longer walk it), and the collector's thresholds are set (GC_THRESHOLDS). Once per process
    (True then): a process that starts the lifespan again (tests) does not freeze its later objects."""
    global _heap_frozen
    if _heap_frozen:
        return False
    _heap_frozen = True
    gc.collect()  # the start-up's garbage is freed, not frozen forever
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return True
