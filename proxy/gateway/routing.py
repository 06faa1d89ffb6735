"""Which deployments a request may go to, in the order they are tried.

A public name resolves to a chain of models: the model itself, then its fallbacks (a router resolves to
the candidates that can serve the request, best first). Each model's deployments are tried by priority
tier (lower first) and, within a tier, in the order its strategy gives. Deployments cooling down go to
the very end: they are tried only when nothing else is left (a lone upstream is never refused unasked).
Deployments found at their own rate limit (`rpm`, `tpm`) come after the others, before those resting;
dispatch counts each call against them and passes over one that is full.
"""

import json
import math
import random
from typing import Any

from proxy.config import ConfigError, Deployment, GatewayConfig, Model, config_in_force
from proxy.errors import GatewayError
from proxy.gateway import health
from proxy.gateway.instructions import json_schema_of
from proxy.gateway.instructions import schema_as_instructions as schema_as_instructions_of
from proxy.usage.ratelimits import deployment_is_full
from turbo_site.core.text import json_bytes

# The configuration this module last answered with: a new one starts health (and what hangs on it) afresh.
_seen: GatewayConfig | None = None


def gateway_config() -> GatewayConfig:
    """The configuration in force: TURBO_CONFIG's file, or the one upstream of OPENAI_API_URL."""
    global _seen
    try:
        config = config_in_force()
    except ConfigError as exc:  # checked at start; this is a file changed under a running server
        raise GatewayError(str(exc), status=503, code="gateway_misconfigured", redact=False) from None
    if config is not _seen:
        if _seen is not None:
            health.forget()
        _seen = config
    return config


# --- what a request needs ----------------------------------------------------------------------------


def _needs(payload: dict | None) -> tuple[set[str], int]:
    """The capabilities a request needs, and its prompt's size in tokens (estimated: 4 bytes each)."""
    needs: set[str] = set()
    if not isinstance(payload, dict):
        return needs, 0
    if payload.get("tools") or payload.get("functions"):
        needs.add("tools")
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        needs.add("json_schema")
    size = 0
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                    needs.add("vision")
                elif isinstance(part, dict):
                    size += len(str(part.get("text") or ""))
        elif isinstance(content, str):
            size += len(content)
        size += 16  # the message's framing
    tools = payload.get("tools")
    if tools:
        size += len(json.dumps(tools, default=str))
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
    return needs, math.ceil(size / 4) + (asked if isinstance(asked, int) else 0)


def _fits(model: Model, needs: set[str], tokens: int) -> bool:
    return needs <= model.capabilities and (model.context_window is None or tokens <= model.context_window)


def _speed(model: Model) -> float:
    """A model's best EWMA time to first byte over its deployments (unknown counts as 0: try it)."""
    latencies = [health.health_of(d.id).ewma_ms or 0.0 for d in model.deployments if not health.is_cooling(d.id)]
    return min(latencies) if latencies else math.inf


def _price(model: Model) -> float:
    if model.price_input is None:
        return math.inf
    return model.price_input + (model.price_output or 0)


def models_for(
    config: GatewayConfig,
    name: str,
    payload: dict | None,
    allowed: frozenset[str] | None,
    *,
    schema_as_instructions: bool = False,
) -> list[Model]:
    """The chain of models to try for the public name `name`. Raises GatewayError 404/403.
    With `schema_as_instructions`, a router does not require native json_schema support."""
    model = config.model(name)
    if model is None:
        raise GatewayError(
            f"the model {name!r} does not exist on this server",
            status=404,
            code="model_not_found",
            error_type="invalid_request_error",
        )
    if allowed is not None and name not in allowed:
        raise GatewayError(
            f"your groups may not use the model {name!r}",
            status=403,
            code="model_not_allowed",
            error_type="invalid_request_error",
        )
    if model.router is None:
        return [model, *(config.models[fallback] for fallback in model.fallbacks if fallback != name)]
    needs, tokens = _needs(payload)
    if schema_as_instructions:
        needs.discard("json_schema")
    candidates = [config.models[candidate] for candidate in model.router.candidates]
    fitting = [candidate for candidate in candidates if _fits(candidate, needs, tokens)]
    if not fitting:
        missing = ", ".join(sorted(needs)) or "nothing special"
        raise GatewayError(
            f"no model behind {name!r} can serve this request (it needs {missing}, about {tokens} tokens)",
            status=400,
            code="no_model_fits",
            error_type="invalid_request_error",
        )
    key = _price if model.router.pick == "cheapest" else _speed
    return sorted(fitting, key=key)  # stable: ties keep the configured order


# --- the order of deployments --------------------------------------------------------------------------


def _ordered(model: Model, deployments: list[Deployment]) -> list[Deployment]:
    if len(deployments) < 2:
        return deployments
    if model.strategy == "least_busy":
        return sorted(deployments, key=lambda d: (health.health_of(d.id).in_flight, random.random()))
    if model.strategy == "latency":
        return sorted(deployments, key=lambda d: (health.health_of(d.id).ewma_ms or 0.0, random.random()))
    # weighted: a random order in which each deployment comes first in proportion to its weight
    # (Efraimidis-Spirakis keys); weight 0 only ever comes last.
    return sorted(deployments, key=lambda d: random.random() ** (1 / d.weight) if d.weight > 0 else -1, reverse=True)


def attempt_order(models: list[Model]) -> list[tuple[Model, Deployment]]:
    """Every (model, deployment) to try, best first; those at their rate limit next, those cooling down last."""
    ready: list[tuple[Model, Deployment]] = []
    full: list[tuple[Model, Deployment]] = []
    resting: list[tuple[Model, Deployment]] = []
    seen: set[str] = set()
    for model in models:
        for tier in sorted({deployment.priority for deployment in model.deployments}):
            in_tier = [d for d in model.deployments if d.priority == tier]
            for deployment in _ordered(model, in_tier):
                if deployment.id in seen:
                    continue
                seen.add(deployment.id)
                if health.is_cooling(deployment.id):
                    resting.append((model, deployment))
                else:
                    (full if deployment_is_full(deployment.id) else ready).append((model, deployment))
    return ready + full + resting


def body_for(
    payload: dict | None,
    body: bytes,
    asked: str,
    deployment: Deployment,
    model: Model,
    *,
    schema_as_instructions: bool = False,
) -> bytes:
    """The request body this deployment gets: its own model name, rewritten as its mapping says (and,
    with `schema_as_instructions`, a json_schema response_format as instructions for a model without it)."""
    if payload is None:
        return body
    instruct = (
        schema_as_instructions and "json_schema" not in model.capabilities and json_schema_of(payload) is not None
    )
    target = deployment.model or (asked if model.name == "*" else model.name)
    if payload.get("model") == target and not deployment.mapping and not instruct:
        return body  # unchanged: no parse-and-dump on the common path
    rewritten: dict[str, Any] = {**payload, "model": target}
    if instruct:
        rewritten = schema_as_instructions_of(rewritten)
    if deployment.mapping:
        rewritten = deployment.mapping.apply(rewritten)
    return json_bytes(rewritten)


def models_list(allowed: frozenset[str] | None) -> dict:
    """/v1/models as the gateway serves it from a config file: the public names a user may ask for."""
    config = gateway_config()
    names = [name for name in config.public_names() if allowed is None or name in allowed]
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "turbo"} for name in names],
    }
