"""The background writer's bell: the queues it drains (usage records, stored objects' owners) ring it.

The writer (proxy.events) imports those queues to drain them, so they cannot import it back; proxy's
AppConfig connects the bell to `proxy.events.writer_wake` when the app is ready.
"""

from collections.abc import Callable

_ring: Callable[..., None] | None = None


def writer_bell_connect(ring: Callable[..., None]) -> None:
    """Have `writer_wake` call `ring(soon=...)`: the writer's own wake."""
    global _ring
    _ring = ring


def writer_wake(*, soon: bool = False) -> None:
    """Make sure the writer runs (for rows queued outside event_record); `soon`: flush now."""
    _ring(soon=soon)
