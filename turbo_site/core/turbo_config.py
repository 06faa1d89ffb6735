"""What the gateway knows: upstreams, and the public model names it serves with their deployments.

Here, below every app (it imports none), so that settings.py checks TURBO_CONFIG at start without
importing proxy; proxy.config is its name in the model path.

Zero config (no TURBO_CONFIG): one upstream, `default`, from OPENAI_API_URL and OPENAI_API_KEY, serving
every model name as asked, with no retries and no cooldown (Turbo as it always was).

With `TURBO_CONFIG=path/to/turbo.yaml`, the file declares both (see docs/gateway.md). Any
string value may be `${NAME}` or `${NAME:-default}`, read from the environment. A bad file is refused
with one `ConfigError` line naming the file, the key and the problem.
"""

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

STRATEGIES = ("weighted", "least_busy", "latency")
PICKS = ("cheapest", "fastest")
CAPABILITIES = ("tools", "vision", "json_schema")
ZERO_CONFIG_UPSTREAM = "default"


class ConfigError(Exception):
    """The gateway's configuration is unusable; the message is one line, fit to stop the server with."""


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible API Turbo may send requests to, with the server's credentials for it."""

    name: str
    base_url: str  # ends in /v1, no trailing slash
    api_key: str = ""
    timeout: float = 600.0  # seconds to wait for bytes
    connect_timeout: float = 10.0
    max_in_flight: int | None = None
    organization: str = ""
    project: str = ""
    problem: str = ""  # zero config only: why this upstream cannot be used (then every call is a 503)

    @property
    def is_azure(self) -> bool:
        return (urlsplit(self.base_url).hostname or "").endswith("openai.azure.com")

    def auth_headers(self, api_key: str | None = None) -> dict[str, str]:
        """The server's credentials for this upstream (a chat's own key, if given, replaces the key)."""
        headers = {}
        key = api_key or self.api_key
        if key and self.is_azure:
            headers["api-key"] = key
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers


@dataclass(frozen=True)
class Mapping:
    """Instruction mapping: how a request is rewritten for one deployment's upstream."""

    rename: tuple[tuple[str, str], ...] = ()  # parameter -> the name this upstream wants
    drop: tuple[str, ...] = ()  # parameters this upstream rejects
    system_to_user: bool = False  # the model has no system role: merge system text into the first user message

    def __bool__(self) -> bool:
        return bool(self.rename or self.drop or self.system_to_user)

    def apply(self, body: dict) -> dict:
        body = dict(body)
        for name in self.drop:
            body.pop(name, None)
        for old, new in self.rename:
            if old in body:
                body[new] = body.pop(old)
        messages = body.get("messages")
        if self.system_to_user and isinstance(messages, list):
            body["messages"] = _system_merged(messages)
        return body


def _system_merged(messages: list) -> list:
    system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    if not system:
        return messages
    text = "\n\n".join(_text_of(m.get("content")) for m in system)
    rest = [m for m in messages if m not in system]
    for index, message in enumerate(rest):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                merged = [{"type": "text", "text": text}, *content]
            else:
                merged = f"{text}\n\n{_text_of(content)}"
            rest[index] = {**message, "content": merged}
            return rest
    return [{"role": "user", "content": text}, *rest]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


@dataclass(frozen=True)
class Deployment:
    """One way to serve a public model: an upstream and the model name it knows it by."""

    id: str  # "upstream/model" unless named; shown in X-Turbo-Upstream, the log and the admin
    upstream: Upstream
    model: str | None  # None: the name the client asked for
    weight: float = 1.0
    priority: int = 0
    mapping: Mapping = field(default_factory=Mapping)
    rpm: int | None = None  # the provider's requests per minute for it: routing goes elsewhere beyond
    tpm: int | None = None  # the same for tokens


@dataclass(frozen=True)
class Router:
    """Intelli-routing: a public name that picks one of `candidates` for each request."""

    candidates: tuple[str, ...]
    pick: str = "cheapest"


@dataclass(frozen=True)
class Model:
    """A public model name and how it is served."""

    name: str
    deployments: tuple[Deployment, ...] = ()
    strategy: str = "weighted"
    fallbacks: tuple[str, ...] = ()
    retries: int = 2
    cooldown_seconds: float = 30.0
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    context_window: int | None = None
    price_input: float | None = None  # USD per 1M tokens
    price_output: float | None = None
    price_cached_input: float | None = None  # None: cached input tokens cost as input
    price_image: float | None = None  # USD per image (images/*), any size
    price_characters: float | None = None  # USD per 1M characters of input (audio/speech)
    price_second: float | None = None  # USD per second of audio (audio/transcriptions, translations)
    router: Router | None = None


@dataclass(frozen=True)
class GatewayConfig:
    source: str  # the file, or "the environment"
    upstreams: tuple[Upstream, ...]
    models: dict[str, Model]  # public name -> model; "*" serves names not declared
    is_file: bool = False

    @cached_property
    def deployments(self) -> list[Deployment]:
        seen: dict[str, Deployment] = {}
        for model in self.models.values():
            for deployment in model.deployments:
                seen.setdefault(deployment.id, deployment)
        return list(seen.values())

    def model(self, name: str) -> Model | None:
        return self.models.get(name) or self.models.get("*")

    def public_names(self) -> list[str]:
        return [name for name in self.models if name != "*"]

    def secrets(self) -> list[str]:
        return [upstream.api_key for upstream in self.upstreams if upstream.api_key]


# --- zero config ---------------------------------------------------------------------------------------


def base_url_of(url: str) -> str:
    """An OpenAI-compatible base URL (with or without /v1) as the one Turbo uses: ending in /v1."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def url_problem(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    return ""


def from_environment(settings) -> GatewayConfig:
    """One upstream from OPENAI_API_URL and OPENAI_API_KEY, serving every model by its own name."""
    url = (settings.OPENAI_API_URL or "").strip()
    problem = ""
    if not url:
        problem = "no upstream is configured: set OPENAI_API_URL"
    elif url_problem(url):
        problem = "OPENAI_API_URL " + url_problem(url)
    elif (urlsplit(url).hostname or "").endswith("api.openai.com") and not settings.OPENAI_API_KEY:
        problem = "no key for the OpenAI API: set OPENAI_API_KEY"
    upstream = Upstream(
        name=ZERO_CONFIG_UPSTREAM,
        base_url=base_url_of(url) if url and not problem else "",
        api_key=settings.OPENAI_API_KEY or "",
        timeout=float(settings.PROXY_READ_TIMEOUT),
        connect_timeout=float(settings.PROXY_CONNECT_TIMEOUT),
        organization=settings.OPENAI_ORGANIZATION or "",
        project=settings.OPENAI_PROJECT or "",
        problem=problem,
    )
    deployment = Deployment(id=ZERO_CONFIG_UPSTREAM, upstream=upstream, model=None)
    model = Model(name="*", deployments=(deployment,), retries=0, cooldown_seconds=0)
    return GatewayConfig(source="the environment", upstreams=(upstream,), models={"*": model})


# --- the file ------------------------------------------------------------------------------------------

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Walks the parsed file, naming each key by its path (models[0].deployments[1].weight) in errors."""

    def __init__(self, source: str, environ):
        self.source = source
        self.environ = environ

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"TURBO_CONFIG {self.source}: {where}: {problem}")

    def table(self, value: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a mapping")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    f"{where}.{key}" if where else str(key), f"unknown key (known: {', '.join(sorted(allowed))})"
                )
        for key in sorted(required):
            if value.get(key) in (None, ""):
                raise self.fail(f"{where}.{key}" if where else key, "is required")
        return value

    def text(self, value: Any, where: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(where, "must be a string")
        value = str(value)

        def expand(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            found = self.environ.get(name)
            if found is None:
                if default is None:
                    raise self.fail(where, f"environment variable {name} is not set")
                return default
            return found

        return _ENV_REFERENCE.sub(expand, value)

    def number(self, value: Any, where: str, *, minimum: float = 0, integer: bool = False) -> float:
        if isinstance(value, str):
            value = self.text(value, where)
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise self.fail(where, "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise self.fail(where, "must be a whole number" if integer else "must be a number")
        if value < minimum:
            raise self.fail(where, f"must be at least {minimum}")
        return value

    def names(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(where, "must be a list")
        return tuple(self.text(item, f"{where}[{index}]") for index, item in enumerate(value))

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        value = self.text(value, where)
        if value not in choices:
            raise self.fail(where, f"must be one of {', '.join(choices)}")
        return value


def load(path: str, environ=None) -> GatewayConfig:
    """Read and check a TURBO_CONFIG file. Raises ConfigError (one line) if anything is wrong."""
    import yaml

    reader = _Reader(path, os.environ if environ is None else environ)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"TURBO_CONFIG {path}: cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark is not None else "the file"
        raise ConfigError(
            f"TURBO_CONFIG {path}: {at}: not valid YAML: {getattr(exc, 'problem', None) or exc}"
        ) from None
    top = reader.table(raw, "", {"upstreams", "models"}, {"upstreams", "models"})
    upstreams = _upstreams(reader, top["upstreams"])
    models = _models(reader, top["models"], upstreams)
    return GatewayConfig(source=path, upstreams=tuple(upstreams.values()), models=models, is_file=True)


def _upstreams(reader: _Reader, raw: Any) -> dict[str, Upstream]:
    if not isinstance(raw, list) or not raw:
        raise reader.fail("upstreams", "must be a non-empty list")
    upstreams: dict[str, Upstream] = {}
    keys = {"name", "base_url", "api_key", "timeout", "connect_timeout", "max_in_flight", "organization", "project"}
    for index, item in enumerate(raw):
        where = f"upstreams[{index}]"
        item = reader.table(item, where, keys, {"name", "base_url"})
        name = reader.text(item["name"], f"{where}.name")
        if name in upstreams:
            raise reader.fail(f"{where}.name", f"duplicate upstream name {name!r}")
        url = reader.text(item["base_url"], f"{where}.base_url")
        if url_problem(url):
            raise reader.fail(f"{where}.base_url", url_problem(url))
        max_in_flight = item.get("max_in_flight")
        upstreams[name] = Upstream(
            name=name,
            base_url=base_url_of(url),
            api_key=reader.text(item["api_key"], f"{where}.api_key") if item.get("api_key") is not None else "",
            timeout=reader.number(item.get("timeout", 600), f"{where}.timeout", minimum=0.001),
            connect_timeout=reader.number(item.get("connect_timeout", 10), f"{where}.connect_timeout", minimum=0.001),
            max_in_flight=(
                int(reader.number(max_in_flight, f"{where}.max_in_flight", minimum=1, integer=True))
                if max_in_flight is not None
                else None
            ),
            organization=reader.text(item.get("organization", ""), f"{where}.organization"),
            project=reader.text(item.get("project", ""), f"{where}.project"),
        )
    return upstreams


def _mapping(reader: _Reader, raw: Any, where: str) -> Mapping:
    item = reader.table(raw, where, {"rename", "drop", "system_to_user"})
    rename = item.get("rename") or {}
    if not isinstance(rename, dict):
        raise reader.fail(f"{where}.rename", "must be a mapping of parameter names")
    system_to_user = item.get("system_to_user", False)
    if not isinstance(system_to_user, bool):
        raise reader.fail(f"{where}.system_to_user", "must be true or false")
    return Mapping(
        rename=tuple((str(old), reader.text(new, f"{where}.rename.{old}")) for old, new in rename.items()),
        drop=reader.names(item.get("drop") or [], f"{where}.drop"),
        system_to_user=system_to_user,
    )


def _deployments(reader: _Reader, raw: Any, where: str, upstreams: dict[str, Upstream]) -> tuple[Deployment, ...]:
    if not isinstance(raw, list) or not raw:
        raise reader.fail(where, "must be a non-empty list")
    deployments = []
    ids = set()
    keys = {"name", "upstream", "model", "weight", "priority", "mapping", "rpm", "tpm"}
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        item = reader.table(item, at, keys, {"upstream"})
        upstream_name = reader.text(item["upstream"], f"{at}.upstream")
        if upstream_name not in upstreams:
            raise reader.fail(f"{at}.upstream", f"no upstream named {upstream_name!r}")
        model = reader.text(item["model"], f"{at}.model") if item.get("model") is not None else None
        deployment_id = (
            reader.text(item["name"], f"{at}.name") if item.get("name") else f"{upstream_name}/{model or '*'}"
        )
        if deployment_id in ids:
            raise reader.fail(at, f"duplicate deployment {deployment_id!r} (give one a name)")
        ids.add(deployment_id)
        deployments.append(
            Deployment(
                id=deployment_id,
                upstream=upstreams[upstream_name],
                model=model,
                weight=reader.number(item.get("weight", 1), f"{at}.weight", minimum=0),
                priority=int(reader.number(item.get("priority", 0), f"{at}.priority", integer=True)),
                mapping=_mapping(reader, item["mapping"], f"{at}.mapping") if item.get("mapping") else Mapping(),
                rpm=_per_minute(reader, item.get("rpm"), f"{at}.rpm"),
                tpm=_per_minute(reader, item.get("tpm"), f"{at}.tpm"),
            )
        )
    if not any(deployment.weight > 0 for deployment in deployments):
        raise reader.fail(where, "at least one deployment needs a weight above 0")
    return tuple(deployments)


def _per_minute(reader: _Reader, value: Any, where: str) -> int | None:
    return None if value is None else int(reader.number(value, where, minimum=1, integer=True))


# A model's `price:` in USD: per 1M tokens (input, output, cached_input), per image, per 1M characters
# of speech input, per second of transcribed audio.
PRICE_KEYS = ("input", "output", "cached_input", "image", "characters", "second")


def _models(reader: _Reader, raw: Any, upstreams: dict[str, Upstream]) -> dict[str, Model]:
    if not isinstance(raw, list) or not raw:
        raise reader.fail("models", "must be a non-empty list")
    keys = {
        "name",
        "strategy",
        "deployments",
        "fallbacks",
        "retries",
        "cooldown_seconds",
        "capabilities",
        "context_window",
        "price",
        "router",
    }
    models: dict[str, Model] = {}
    for index, item in enumerate(raw):
        where = f"models[{index}]"
        item = reader.table(item, where, keys, {"name"})
        name = reader.text(item["name"], f"{where}.name")
        if name in models:
            raise reader.fail(f"{where}.name", f"duplicate model name {name!r}")
        router = None
        if item.get("router") is not None:
            if item.get("deployments"):
                raise reader.fail(f"{where}.router", "a router has candidates, not deployments")
            spec = reader.table(item["router"], f"{where}.router", {"candidates", "pick"}, {"candidates"})
            router = Router(
                candidates=reader.names(spec["candidates"], f"{where}.router.candidates"),
                pick=reader.choice(spec.get("pick", "cheapest"), f"{where}.router.pick", PICKS),
            )
            if not router.candidates:
                raise reader.fail(f"{where}.router.candidates", "must name at least one model")
            deployments: tuple[Deployment, ...] = ()
        else:
            if item.get("deployments") is None:
                raise reader.fail(f"{where}.deployments", "is required (or a router)")
            deployments = _deployments(reader, item["deployments"], f"{where}.deployments", upstreams)
        price = item.get("price")
        if price is not None:
            price = reader.table(price, f"{where}.price", set(PRICE_KEYS))
            if not any(price.get(key) is not None for key in PRICE_KEYS if key != "cached_input"):
                raise reader.fail(f"{where}.price", "needs input and output, or image, characters or second")
            if (price.get("input") is None) != (price.get("output") is None):
                raise reader.fail(f"{where}.price", "input and output go together")
        prices = {
            key: reader.number(price[key], f"{where}.price.{key}")
            for key in PRICE_KEYS
            if price and price.get(key) is not None
        }
        capabilities = item.get("capabilities")
        if capabilities is not None:
            capabilities = reader.names(capabilities, f"{where}.capabilities")
            for position, capability in enumerate(capabilities):
                if capability not in CAPABILITIES:
                    raise reader.fail(f"{where}.capabilities[{position}]", f"must be one of {', '.join(CAPABILITIES)}")
        context_window = item.get("context_window")
        models[name] = Model(
            name=name,
            deployments=deployments,
            strategy=reader.choice(item.get("strategy", "weighted"), f"{where}.strategy", STRATEGIES),
            fallbacks=reader.names(item.get("fallbacks") or [], f"{where}.fallbacks"),
            retries=int(reader.number(item.get("retries", 2), f"{where}.retries", integer=True)),
            cooldown_seconds=reader.number(item.get("cooldown_seconds", 30), f"{where}.cooldown_seconds"),
            capabilities=frozenset(CAPABILITIES if capabilities is None else capabilities),
            context_window=(
                int(reader.number(context_window, f"{where}.context_window", minimum=1, integer=True))
                if context_window is not None
                else None
            ),
            price_input=prices.get("input"),
            price_output=prices.get("output"),
            price_cached_input=prices.get("cached_input"),
            price_image=prices.get("image"),
            price_characters=prices.get("characters"),
            price_second=prices.get("second"),
            router=router,
        )
    for index, model in enumerate(models.values()):
        where = f"models[{index}]"
        for position, fallback in enumerate(model.fallbacks):
            if fallback not in models or models[fallback].router is not None:
                raise reader.fail(f"{where}.fallbacks[{position}]", f"no model with deployments named {fallback!r}")
        if model.router is not None:
            for position, candidate in enumerate(model.router.candidates):
                if candidate not in models or models[candidate].router is not None:
                    raise reader.fail(
                        f"{where}.router.candidates[{position}]", f"no model with deployments named {candidate!r}"
                    )
    return models
