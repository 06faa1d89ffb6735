"""The model gateway: every call that leaves Turbo for a model goes through here.

routing.py   which deployments a request may go to, in order (strategies, routers, fallbacks)
health.py    cooldowns, failures, latency and in-flight counts (shared over Redis)
client.py    the one HTTP client (aiohttp)
dispatch.py  send(): one request, with failover while nothing has been sent
calls.py     chat(), chat_stream(), embeddings(): typed results for Turbo's own code
instructions.py  a json_schema response_format as instructions, for models without native support
windows.py   context windows, declared or learned, and context_fit(): a chat request cut to its window

The gateway stands on proxy.usage (budgets, rate limits, prices, usage records), and both stand on the
floor below them, outside this package: proxy.config (upstreams and public model names from TURBO_CONFIG,
or OPENAI_API_URL alone; the configuration in force and the keys it holds) and proxy.errors
(GatewayError, the one error type). Their public names are re-exported here.
"""

from proxy.config import ConfigError, secrets_known, text_redact
from proxy.errors import Attempt, GatewayError
from proxy.gateway.calls import ChatStream, Completion, Delta, UsageReader, chat, chat_stream, embeddings
from proxy.gateway.client import TransportError
from proxy.gateway.dispatch import ERROR_BODY_MAX_BYTES, Answer, Call, send
from proxy.gateway.routing import gateway_config, models_list
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
