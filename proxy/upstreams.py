"""What operators see of the model gateway: each deployment's live health, and which upstreams answer.

`manage.py upstreams list|check` and the admin's "Upstream health" page are thin adapters over
`deployments_health()` and `upstreams_check()`; the web app's model pickers offer `models_offered()`.
Nothing here shows an API key: base URLs lose any
`user:password@`, and every text that came from an upstream or an error is redacted.
"""

import asyncio
import json
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone

from proxy.config import GatewayConfig, Upstream, text_redact
from proxy.gateway import client, health
from proxy.gateway.routing import gateway_config, models_list
from proxy.usage.pricing import price_known

MODELS_MAX_BYTES = 16 * 1024 * 1024  # a /models answer larger than this is not parsed
ANY_MODEL = "*"
_USERINFO = re.compile(r"//[^/@\s]+@")


def health_is_shared() -> bool:
    """Whether deployment health is shared by every server process (through Redis), or per process."""
    return bool(settings.REDIS_ADDRESS)


async def shared_health_problem() -> str:
    """Why the health shared through Redis cannot be read ("" when it can, or when it is not shared)."""
    return _USERINFO.sub("//", await health.shared_problem())


def url_shown(url: str) -> str:
    """`url` fit to show an operator: without any `user:password@`."""
    if not url:
        return ""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _clock(moment: float) -> str:
    return timezone.localtime(datetime.fromtimestamp(moment, tz=UTC)).strftime("%H:%M:%S")


@dataclass(frozen=True)
class DeploymentHealth:
    """One deployment as configured, and how it is doing."""

    id: str
    models: tuple[str, ...]  # the public names it serves ("*": any name asked for)
    upstream: str
    base_url: str
    upstream_model: str  # the name the upstream knows it by; "" when it gets the name asked for
    weight: float
    priority: int
    cooling_until: float | None  # epoch seconds; None when not cooling down
    is_probing: bool  # the cooldown is over and one request probes it before the others follow
    last_error: str
    recent_failures: int
    ewma_ms: float | None  # time to the first byte, averaged
    in_flight: int
    requests: int

    @property
    def weight_text(self) -> str:
        return f"{self.weight:g}"

    @property
    def state(self) -> str:
        """healthy, cooling or probing."""
        if self.cooling_until is not None:
            return "cooling"
        return "probing" if self.is_probing else "healthy"

    @property
    def state_text(self) -> str:
        """The state for people: "cooling until 14:03:07" (the site's time zone)."""
        if self.cooling_until is not None:
            return f"cooling until {_clock(self.cooling_until)}"
        return self.state

    def as_json(self) -> dict:
        return {**asdict(self), "models": list(self.models), "state": self.state}


def _served_by(config: GatewayConfig) -> dict[str, list[str]]:
    """Deployment id -> the public model names that route to it directly."""
    names: dict[str, list[str]] = {}
    for model in config.models.values():
        for deployment in model.deployments:
            names.setdefault(deployment.id, []).append(model.name)
    return names


async def deployments_health() -> list[DeploymentHealth]:
    """Every deployment of the configuration in force, with its health: shared by every process when
    Redis is set, else this process's. Raises GatewayError if TURBO_CONFIG became unusable."""
    config = gateway_config()
    deployments = config.deployments
    ids = [deployment.id for deployment in deployments]
    figures = await health.snapshot(ids)
    served_by = _served_by(config)
    return [
        DeploymentHealth(
            id=deployment.id,
            models=tuple(served_by.get(deployment.id, ())),
            upstream=deployment.upstream.name,
            base_url=url_shown(deployment.upstream.base_url),
            upstream_model=deployment.model or "",
            weight=deployment.weight,
            priority=deployment.priority,
            cooling_until=figures[deployment.id]["cooling_until"],
            is_probing=figures[deployment.id]["probing"],
            last_error=text_redact(figures[deployment.id]["last_error"] or ""),
            recent_failures=figures[deployment.id]["recent_failures"],
            ewma_ms=figures[deployment.id]["ewma_ms"],
            in_flight=figures[deployment.id]["in_flight"],
            requests=figures[deployment.id]["requests"],
        )
        for deployment in deployments
    ]


# --- check: does each upstream answer GET /models? -------------------------------------------------------


@dataclass(frozen=True)
class UpstreamCheck:
    """What one upstream answered to GET {base_url}/models."""

    upstream: str
    base_url: str
    is_reachable: bool  # it answered 2xx
    status: int | None = None
    ms: float | None = None
    model_count: int | None = None  # None: the answer held no model list
    listed: dict[str, bool] = field(default_factory=dict)  # each deployment's model name: in the list?
    problem: str = ""  # why it is not reachable: one line, no secrets
    # Models it listed that clients may ask for by name (it serves the config's "*") and that have no price.
    unpriced: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)


def _names_asked_of(upstream: Upstream, config: GatewayConfig) -> list[str]:
    """The model names this upstream's deployments send it (not those sent on as the client asked)."""
    names: list[str] = []
    for model in config.models.values():
        for deployment in model.deployments:
            if deployment.upstream.name != upstream.name:
                continue
            name = deployment.model or (model.name if model.name != ANY_MODEL else "")
            if name and name not in names:
                names.append(name)
    return names


def _transport_problem(exc: client.TransportError, timeout: float) -> str:
    if exc.timeout:
        return f"no answer within {timeout:g}s"
    os_error = getattr(exc.__cause__, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return f"{exc}: connection refused"
    if isinstance(os_error, socket.gaierror):
        return f"{exc}: host not found ({os_error.strerror})"
    if isinstance(os_error, OSError):
        return f"{exc}: {os_error.strerror or type(os_error).__name__}"
    if isinstance(exc.__cause__, ValueError) and str(exc.__cause__):
        # e.g. aiohttp refusing credentials in the URL beside an Authorization header
        return f"{exc}: {_USERINFO.sub('//', str(exc.__cause__))}"
    return str(exc)


def _error_text(body: bytes) -> str:
    """An upstream error's message: OpenAI's error.message, else the start of the body."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else body[:200].decode("utf-8", "replace")
    return " ".join(text.split())[:200]


def _model_ids(body: bytes) -> list[str] | None:
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return [str(item.get("id")) for item in data if isinstance(item, dict) and item.get("id") is not None]


def _serves_any(upstream: Upstream, config: GatewayConfig) -> bool:
    """Does this upstream serve model names the config does not declare (through its "*" model)?"""
    any_model = config.models.get(ANY_MODEL)
    return any_model is not None and any(d.upstream.name == upstream.name for d in any_model.deployments)


def models_unpriced(config: GatewayConfig, checks: list[UpstreamCheck]) -> list[str]:
    """The public model names with no known price (counted at DEFAULT_PRICE, or refused under a budget
    with UNPRICED_MODELS=refuse): those the config declares, and those an upstream serving "*" lists."""
    found = [
        name
        for name, model in config.models.items()
        if name != ANY_MODEL and model.router is None and price_known(name) is None
    ]
    for check in checks:
        found += [name for name in check.unpriced if name not in found]
    return found


async def _check(upstream: Upstream, names: list[str], timeout: float, serves_any: bool = False) -> UpstreamCheck:
    base_url = url_shown(upstream.base_url)
    if upstream.problem:
        return UpstreamCheck(upstream.name, base_url, is_reachable=False, problem=upstream.problem)
    began = time.perf_counter()
    try:
        status, body = await client.models_get(upstream, timeout=timeout, max_bytes=MODELS_MAX_BYTES)
    except TimeoutError:
        return UpstreamCheck(upstream.name, base_url, is_reachable=False, problem=f"no answer within {timeout:g}s")
    except client.TransportError as exc:
        problem = text_redact(_USERINFO.sub("//", _transport_problem(exc, timeout)))
        return UpstreamCheck(upstream.name, base_url, is_reachable=False, problem=problem)
    ms = round((time.perf_counter() - began) * 1000, 1)
    if not 200 <= status < 300:
        problem = text_redact(f"answered {status}: {_error_text(body)}")
        return UpstreamCheck(upstream.name, base_url, is_reachable=False, status=status, ms=ms, problem=problem)
    ids = _model_ids(body)
    return UpstreamCheck(
        upstream.name,
        base_url,
        is_reachable=True,
        status=status,
        ms=ms,
        model_count=None if ids is None else len(ids),
        listed={} if ids is None else {name: name in ids for name in names},
        unpriced=[name for name in ids or [] if price_known(name) is None] if serves_any else [],
    )


async def upstreams_check(*, timeout: float = 5.0) -> list[UpstreamCheck]:
    """Ask every upstream for its /models with the server's credentials, all at once, each within
    `timeout` seconds. Raises GatewayError if TURBO_CONFIG became unusable."""
    config = gateway_config()
    return list(
        await asyncio.gather(
            *(
                _check(upstream, _names_asked_of(upstream, config), timeout, _serves_any(upstream, config))
                for upstream in config.upstreams
            )
        )
    )


# What the model pickers offer in zero config (one upstream serving every name): the chat models it lists.
SERVED_MODELS_CACHE_SECONDS = 300
_NOT_CHAT = ("text-embedding", "embedding", "tts", "whisper", "dall-e", "gpt-image", "omni-moderation", "moderation")


async def served_models() -> list[str] | None:
    """The chat models the one upstream lists at /models (cached for a few minutes, so a page costs no
    call); None when it cannot say (unreachable, no listing, a gateway file: its names are the answer)."""
    from django.core.cache import cache

    config = gateway_config()
    if config.is_file or not config.upstreams:
        return None
    cached = await cache.aget("upstream.served_models")
    if cached is not None:
        return cached or None
    ids: list[str] | None = None
    try:
        status, body = await client.models_get(config.upstreams[0], timeout=3, max_bytes=MODELS_MAX_BYTES)
        if 200 <= status < 300:
            ids = _model_ids(body)
    except (TimeoutError, client.TransportError):
        pass
    chat_models = sorted(name for name in ids or () if not name.lower().startswith(_NOT_CHAT))
    await cache.aset("upstream.served_models", chat_models, SERVED_MODELS_CACHE_SECONDS if ids is not None else 30)
    return chat_models or None


def models_offered(allowed_models: frozenset[str] | None) -> list[str]:
    """The models to offer, the default first: the gateway's public names the user may use; without a
    config file, the chat models the upstream lists (those the user may use), or, if it cannot say, the
    default model and the aliases' models (or just the ones the user may use)."""
    names = [model["id"] for model in models_list(allowed_models)["data"]]
    if not names:
        served = async_to_sync(served_models)()
        if served is not None:
            names = [name for name in served if allowed_models is None or name in allowed_models]
        elif allowed_models is not None:
            names = sorted(allowed_models)
        else:
            names = [settings.DEFAULT_MODEL, *settings.MODEL_ALIASES.values()]
    if settings.DEFAULT_MODEL in names:
        names = [settings.DEFAULT_MODEL, *(name for name in names if name != settings.DEFAULT_MODEL)]
    return list(dict.fromkeys(names))
