"""The model gateway: every call that leaves Turbo for a model goes through here.

config.py    upstreams and public model names (TURBO_CONFIG, or OPENAI_API_URL alone)
routing.py   which deployments a request may go to, in order (strategies, routers, fallbacks)
health.py    cooldowns, failures, latency and in-flight counts (shared over Redis)
client.py    the one HTTP client (aiohttp)
dispatch.py  send(): one request, with failover while nothing has been sent
calls.py     chat(), chat_stream(), embeddings(): typed results for Turbo's own code
errors.py    GatewayError, the one error type
"""

from proxy.gateway.calls import ChatStream, Completion, Delta, UsageReader, chat, chat_stream, embeddings
from proxy.gateway.client import TransportError
from proxy.gateway.config import ConfigError
from proxy.gateway.dispatch import ERROR_BODY_MAX_BYTES, Answer, Call, send
from proxy.gateway.errors import Attempt, GatewayError
from proxy.gateway.routing import gateway_config, models_list, text_redact

__all__ = [
    "ERROR_BODY_MAX_BYTES",
    "Answer",
    "Attempt",
    "Call",
    "ChatStream",
    "Completion",
    "ConfigError",
    "Delta",
    "GatewayError",
    "chat",
    "chat_stream",
    "embeddings",
    "gateway_config",
    "models_list",
    "send",
    "text_redact",
    "TransportError",
    "UsageReader",
]
