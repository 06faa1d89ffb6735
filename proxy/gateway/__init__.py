"""The model gateway: every call that leaves Turbo for a model goes through here.

config.py    upstreams and public model names (TURBO_CONFIG, or OPENAI_API_URL alone), read and checked
             by turbo_site.core.turbo_config (which settings.py checks TURBO_CONFIG with)
current.py   the configuration in force and the keys it holds (for redaction)
routing.py   which deployments a request may go to, in order (strategies, routers, fallbacks)
health.py    cooldowns, failures, latency and in-flight counts (shared over Redis)
client.py    the one HTTP client (aiohttp)
dispatch.py  send(): one request, with failover while nothing has been sent
calls.py     chat(), chat_stream(), embeddings(): typed results for Turbo's own code
instructions.py  a json_schema response_format as instructions, for models without native support
windows.py   context windows, declared or learned, and context_fit(): a chat request cut to its window
errors.py    GatewayError, the one error type

config, current and errors are the floor: proxy.usage (budgets, rate limits, prices, usage records)
stands on them, and the call path (routing, dispatch, calls) stands on proxy.usage.
"""

from proxy.gateway.calls import ChatStream, Completion, Delta, UsageReader, chat, chat_stream, embeddings
from proxy.gateway.client import TransportError
from proxy.gateway.config import ConfigError
from proxy.gateway.dispatch import ERROR_BODY_MAX_BYTES, Answer, Call, send
from proxy.gateway.errors import Attempt, GatewayError
from proxy.gateway.routing import gateway_config, models_list, secrets_known, text_redact
from proxy.gateway.windows import context_fit

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
    "context_fit",
    "embeddings",
    "gateway_config",
    "models_list",
    "secrets_known",
    "send",
    "text_redact",
    "TransportError",
    "UsageReader",
]
