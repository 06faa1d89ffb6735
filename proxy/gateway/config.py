"""The gateway's configuration: upstreams, and the public model names it serves with their deployments.

Read and checked by turbo_site.core.turbo_config (below every app, so that settings.py checks TURBO_CONFIG
without importing the gateway); these are its names as the gateway uses them.
"""

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
    "from_environment",
    "load",
    "url_problem",
]
