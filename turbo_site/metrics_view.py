"""`/metrics`: Prometheus text for a scraper holding METRICS_TOKEN or calling from METRICS_ALLOWED_IPS."""

import functools
import hmac
import ipaddress
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from proxy import events
from turbo_site.core import metrics
from turbo_site.core.errors import error_response
from turbo_site.core.http import client_ip

logger = logging.getLogger("turbo")


@functools.lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            logger.warning("METRICS_ALLOWED_IPS: %r is not an address or a network; ignored", entry)
    return tuple(networks)


def _bearer(request) -> str:
    scheme, _, credentials = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    if token and hmac.compare_digest(_bearer(request).encode(), token.encode()):
        return True
    address = client_ip(request)  # X-Forwarded-For only from TRUSTED_PROXIES
    if not address or not settings.METRICS_ALLOWED_IPS:
        return False
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in _networks(tuple(settings.METRICS_ALLOWED_IPS)))


@csrf_exempt  # GET only: any other method is a 405
async def metrics_view(request):
    """Every process's figures (one process's without METRICS_MULTIPROC_DIR); 404 while metrics are off."""
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "method_not_allowed", f"method {request.method} is not allowed here")
        response["Allow"] = "GET, HEAD"
        return response
    if not (settings.METRICS_TOKEN or settings.METRICS_ALLOWED_IPS):
        return error_response(404, "not_found", f"no endpoint at {request.path}")
    if not _allowed(request):
        return error_response(
            403, "forbidden", "metrics need the METRICS_TOKEN as a Bearer token, or a client address allowed"
        )
    metrics.events_queued(events.events_state()["queued"])  # this process's, fresh
    body = await sync_to_async(metrics.exposition, thread_sensitive=False)()
    return HttpResponse(body, content_type=metrics.CONTENT_TYPE)


def add_metrics_path(result, generator, request, public):
    """drf-spectacular postprocessing hook: /metrics."""
    error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
    result.setdefault("paths", {})["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "tags": ["operations"],
            "summary": "Prometheus text (METRICS_TOKEN as a Bearer token, or a METRICS_ALLOWED_IPS address)",
            "security": [],
            "responses": {
                "200": {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "403": {"description": "neither the token nor an allowed address", "content": error},
                "404": {"description": "metrics are off (neither setting is set)", "content": error},
            },
        }
    }
    return result
