"""The model gateway: every call that leaves Turbo for a model goes through here.

config.py    upstreams and public model names (TURBO_CONFIG, or OPENAI_API_URL alone)
routing.py   which deployments a request may go to, in order (strategies, routers, fallbacks)
health.py    cooldowns, failures, latency and in-flight counts (shared over Redis)
client.py    the one HTTP client (aiohttp)
dispatch.py  send(): one request, with failover while nothing has been sent
calls.py     chat(), chat_stream(), embeddings(): typed results for Turbo's own code
instructions.py  a json_schema response_format as instructions, for models without native support
windows.py   context windows, declared or learned, and context_fit(): a chat request cut to its window
errors.py    GatewayError, the one error type
"""

import importlib

# Where each name lives. Imported when first asked for (PEP 562), so that settings.py can check
# TURBO_CONFIG with proxy.gateway.config alone, before the modules that read settings are loaded.
_HOMES = {
    "ChatStream": "calls",
    "Completion": "calls",
    "Delta": "calls",
    "UsageReader": "calls",
    "chat": "calls",
    "chat_stream": "calls",
    "embeddings": "calls",
    "TransportError": "client",
    "ConfigError": "config",
    "ERROR_BODY_MAX_BYTES": "dispatch",
    "Answer": "dispatch",
    "Call": "dispatch",
    "send": "dispatch",
    "Attempt": "errors",
    "GatewayError": "errors",
    "gateway_config": "routing",
    "models_list": "routing",
    "secrets_known": "routing",
    "text_redact": "routing",
    "context_fit": "windows",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'proxy.gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"proxy.gateway.{home}"), name)
    globals()[name] = value
    return value


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
