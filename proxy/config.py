"""The gateway's configuration: its names, the configuration in force, and the keys it holds.

The floor under the model path: the gateway's call path (proxy.gateway) and usage (proxy.usage: prices
from the config, budgets, rate limits) both stand on it, and it imports neither. TURBO_CONFIG is read and
checked by turbo_site.core.turbo_config (below every app, so that settings.py checks it without importing
proxy); its names are the gateway's, re-exported here.

GatewayError (proxy.errors) redacts every key Turbo sends upstream from its message, so the keys must be
known without the routing that raises it. A broken file raises ConfigError here;
proxy.gateway.routing.gateway_config answers it as a GatewayError (503).
"""

from django.conf import settings

from turbo_site.core.http import redact_keys
from turbo_site.core.turbo_config import (
    CAPABILITIES,
    PICKS,
    PRICE_KEYS,
    STRATEGIES,
    ZERO_CONFIG_UPSTREAM,
    ConfigError,
    Deployment,
    GatewayConfig,
    Mapping,
    Model,
    Router,
    Upstream,
    base_url_of,
    from_environment,
    load,
    url_problem,
)

__all__ = [
    "CAPABILITIES",
    "PICKS",
    "PRICE_KEYS",
    "STRATEGIES",
    "ZERO_CONFIG_UPSTREAM",
    "ConfigError",
    "Deployment",
    "GatewayConfig",
    "Mapping",
    "Model",
    "Router",
    "Upstream",
    "base_url_of",
    "config_in_force",
    "from_environment",
    "load",
    "secrets_known",
    "text_redact",
    "url_problem",
]

_cached: tuple[tuple, GatewayConfig] | None = None


def config_in_force() -> GatewayConfig:
    """TURBO_CONFIG's file, or the one upstream of OPENAI_API_URL (read again when a setting changed).
    Raises ConfigError for a file that cannot be used."""
    global _cached
    key = (
        settings.TURBO_CONFIG,
        settings.OPENAI_API_URL,
        settings.OPENAI_API_KEY,
        settings.OPENAI_ORGANIZATION,
        settings.OPENAI_PROJECT,
        settings.PROXY_READ_TIMEOUT,
        settings.PROXY_CONNECT_TIMEOUT,
    )
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    config = load(settings.TURBO_CONFIG) if settings.TURBO_CONFIG else from_environment(settings)
    _cached = (key, config)
    return config


def secrets_known() -> list[str]:
    """Every key Turbo sends upstream: OPENAI_API_KEY and each TURBO_CONFIG upstream's."""
    try:
        secrets = config_in_force().secrets()
    except ConfigError:  # a file broken under a running server: the keys known before it broke
        secrets = _cached[1].secrets() if _cached is not None else []
    return [secret for secret in (settings.OPENAI_API_KEY, *secrets) if secret]


def text_redact(text: str) -> str:
    """Upstream text with keys taken out: every configured key, and anything key-like (an upstream
    may quote the key it was sent: "Incorrect API key provided: sk-...")."""
    return redact_keys(text, *secrets_known())
