"""Turbo's settings: every knob comes from an environment variable (docs/configuration.md lists them)."""

import os
import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from turbo_site.core.redis_retry import bounded_cache_options, channel_layer_hosts

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_env_file(path: Path) -> None:
    """KEY=VALUE lines of a local install's env file (`make run` writes a generated SECRET_KEY there);
    a variable set in the environment wins over the file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name, value = name.strip().removeprefix("export "), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ.setdefault(name.strip(), value)


_load_env_file(Path(os.environ.get("TURBO_ENV_FILE") or BASE_DIR / ".env"))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    value = env_str(name)
    if not value:
        return default
    return value.lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = env_str(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def env_duration(name: str, default: str) -> timedelta:
    """A duration as seconds (`3600`) or with a unit (`90m`, `12h`, `30d`)."""
    value = env_str(name, default).lower()
    match = _DURATION.match(value)
    if not match:
        raise ImproperlyConfigured(f"{name} must be seconds or a number with s/m/h/d, got {value!r}")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


DEBUG = env_bool("DEBUG")
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY to a long random string "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))'), run `make env` to write a "
            "generated one to .env for a local install, or set DEBUG=1 to use the development key."
        )
    SECRET_KEY = "turbo-development-only-key-never-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")

INSTALLED_APPS = [
    "daphne",  # first, so that runserver serves WebSockets too
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "accounts",
    "groups",
    "chats",
    "proxy",
    "turbo_site",  # the site's own commands (graphql_schema, grpcserve): they serve every app
]

MIDDLEWARE = [
    "proxy.middleware.event_log",
    "turbo_site.core.middleware.json_errors",
    "turbo_site.core.middleware.body_size_limit",
    "turbo_site.core.middleware.secure_transport",
    # Django's own, in the event loop for async requests (turbo_site.core.django_middleware says when).
    "turbo_site.core.django_middleware.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "turbo_site.core.django_middleware.SessionMiddleware",
    "turbo_site.core.django_middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "turbo_site.core.django_middleware.AuthenticationMiddleware",
    "turbo_site.core.django_middleware.MessageMiddleware",
    "turbo_site.core.django_middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "turbo_site.urls"
ASGI_APPLICATION = "turbo_site.asgi.application"
AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
VERSION = "0.1.0"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------
DB_ADDRESS = env_str("DB_ADDRESS")
if DB_ADDRESS:
    if not DB_ADDRESS.startswith(("sqlite:", "postgres:", "postgresql:", "pgsql:")):
        raise ImproperlyConfigured("DB_ADDRESS must be a sqlite:/// or postgresql:// URL")
    _database = dj_database_url.parse(DB_ADDRESS)
else:
    _database = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(BASE_DIR / "turbo.db")}
if _database["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers and one writer work at once; IMMEDIATE avoids "database is locked" upgrades.
    _database["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
# Postgres connections come from a pool per process (psycopg_pool, through Django): at most DB_POOL_SIZE
# open at once, however many requests, streams and generations run; a request that finds none free
# within DB_POOL_TIMEOUT seconds is a 503 with Retry-After, like a database that is away.
DB_POOL_SIZE = env_int("DB_POOL_SIZE", 10)
DB_POOL_TIMEOUT = env_float("DB_POOL_TIMEOUT", 10.0)
if _database["ENGINE"] == "django.db.backends.postgresql" and DB_POOL_SIZE > 0:
    _database["CONN_MAX_AGE"] = 0  # the pool keeps connections; Django must not keep them too
    # Each connection is checked as the pool hands it out (one empty round trip): after a database
    # restart or a cut connection, a request gets a live one instead of failing on the dead one.
    _database["CONN_HEALTH_CHECKS"] = True
    # Which process a connection is (pg_stat_activity): `turbo:<pid>`.
    _database.setdefault("OPTIONS", {}).setdefault("application_name", f"turbo:{os.getpid()}")
    _database.setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DB_POOL_SIZE,
        "timeout": DB_POOL_TIMEOUT,
        "max_idle": 300,  # a connection idle this long is closed (down to min_size)
    }
DATABASES = {"default": _database}

# --- Cache and channel layer ----------------------------------------------------------------------
REDIS_ADDRESS = env_str("REDIS_ADDRESS")
if REDIS_ADDRESS and not REDIS_ADDRESS.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured("REDIS_ADDRESS must be a redis:// or rediss:// URL")
# Connections per pool per process at most (the stream, cache and script clients each have one pool).
REDIS_POOL_SIZE = env_int("REDIS_POOL_SIZE", 3)
if REDIS_POOL_SIZE < 1:
    raise ImproperlyConfigured("REDIS_POOL_SIZE must be at least 1")
if REDIS_ADDRESS:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_ADDRESS,
            "KEY_PREFIX": "turbo",
            # At most REDIS_POOL_SIZE connections (callers wait for one); a pooled connection found dead
            # after a Redis restart is replaced, not reported as an error.
            "OPTIONS": bounded_cache_options(REDIS_POOL_SIZE),
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": channel_layer_hosts(REDIS_ADDRESS),
                "prefix": "turbo",
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": "turbo"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Accounts and sessions ------------------------------------------------------------------------
SESSION_TTL = env_duration("SESSION_TTL", "30d")
JWT_TTL = env_duration("JWT_TTL", "24h")
# How long a token lookup is trusted from the cache; revocation deletes the entry at once.
SESSION_CACHE_SECONDS = env_int("SESSION_CACHE_SECONDS", 60)
SESSION_COOKIE_NAME_TURBO = "sess"
PASSWORD_MIN_LENGTH = env_int("PASSWORD_MIN_LENGTH", 6)
LOGIN_FAILURES_PER_USERNAME = env_int("LOGIN_FAILURES_PER_USERNAME", 10)
LOGIN_FAILURES_PER_IP = env_int("LOGIN_FAILURES_PER_IP", 50)
LOGIN_FAILURE_WINDOW_SECONDS = env_int("LOGIN_FAILURE_WINDOW_SECONDS", 900)
# Reverse proxies whose X-Forwarded-For is believed (exact addresses).
TRUSTED_PROXIES = env_list("TRUSTED_PROXIES")

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": PASSWORD_MIN_LENGTH},
    },
]

# --- HTTP -----------------------------------------------------------------------------------------
MAX_BODY_BYTES = env_int("MAX_BODY_BYTES", 1024 * 1024)
PROXY_MAX_BODY_BYTES = env_int("PROXY_MAX_BODY_BYTES", 25 * 1024 * 1024)
# Turbo enforces its own per-path limits (413) in turbo_site.core.middleware.
DATA_UPLOAD_MAX_MEMORY_SIZE = None
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# GraphQL (/graphql): how large, deep and costly a query may be and how many model calls it may make
# (turbo_site.core.graphql), and whether introspection and the GraphiQL page are on (also with DEBUG=1).
GRAPHQL_MAX_QUERY_BYTES = env_int("GRAPHQL_MAX_QUERY_BYTES", 32 * 1024)
GRAPHQL_MAX_TOKENS = env_int("GRAPHQL_MAX_TOKENS", 2000)
GRAPHQL_MAX_VARIABLE_VALUES = env_int("GRAPHQL_MAX_VARIABLE_VALUES", 5000)
GRAPHQL_MAX_FIELDS = env_int("GRAPHQL_MAX_FIELDS", 100)
GRAPHQL_MAX_DEPTH = env_int("GRAPHQL_MAX_DEPTH", 10)
GRAPHQL_MAX_COST = env_int("GRAPHQL_MAX_COST", 5000)
GRAPHQL_MAX_MODEL_CALLS = env_int("GRAPHQL_MAX_MODEL_CALLS", 1)
GRAPHQL_PLAYGROUND = env_bool("GRAPHQL_PLAYGROUND")

CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS")
CORS_ALLOW_CREDENTIALS = True
CSRF_TRUSTED_ORIGINS = CORS_ALLOWED_ORIGINS
# TLS (docs/configuration.md). A request is secure over https, or with `X-Forwarded-Proto: https` from one of
# TRUSTED_PROXIES (core.middleware.secure_transport drops the header from anyone else); every cookie of a
# secure request's response is Secure. HSTS, the redirect and the policies below are Django's.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT")
# Paths (regular expressions, without the leading /) left on plain HTTP under SECURE_SSL_REDIRECT: probes, scrapers.
SECURE_REDIRECT_EXEMPT = env_list("SECURE_REDIRECT_EXEMPT", r"^health$,^metrics$")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS")
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD")
SECURE_REFERRER_POLICY = env_str("SECURE_REFERRER_POLICY", "same-origin") or None
SECURE_CROSS_ORIGIN_OPENER_POLICY = env_str("SECURE_CROSS_ORIGIN_OPENER_POLICY", "same-origin") or None
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# A page form whose CSRF check fails gets a page saying so, not the API's JSON error.
CSRF_FAILURE_VIEW = "accounts.web.csrf_failure"

# --- Upstream and proxy ---------------------------------------------------------------------------
OPENAI_API_KEY = env_str("OPENAI_API_KEY")
OPENAI_API_URL = env_str("OPENAI_API_URL", "https://api.openai.com/v1")
PROXY_CONNECT_TIMEOUT = env_int("PROXY_CONNECT_TIMEOUT", 10)
PROXY_READ_TIMEOUT = env_int("PROXY_READ_TIMEOUT", 600)
PROXY_MAX_CONNECTIONS = env_int("PROXY_MAX_CONNECTIONS", 200)
# Idle pooled upstream connections are dropped after this, before the upstream's keep-alive timeout.
PROXY_KEEPALIVE_SECONDS = env_float("PROXY_KEEPALIVE_SECONDS", 4.0)
# The model gateway's file of upstreams and models (docs/gateway.md); without it,
# OPENAI_API_URL and OPENAI_API_KEY are the one upstream. A bad file stops Turbo here, in one line.
TURBO_CONFIG = env_str("TURBO_CONFIG")  # checked at the end of this file, once every setting is defined
# How often a process reads the deployments' shared health (cooldowns) from Redis, at most.
GATEWAY_HEALTH_SYNC_SECONDS = env_float("GATEWAY_HEALTH_SYNC_SECONDS", 1.0)
# Extra request headers to pass upstream, beyond the ones OpenAI clients need.
PROXY_FORWARD_HEADERS = env_list("PROXY_FORWARD_HEADERS")
# Paths under /v1/ the proxy serves (prefixes, segment by segment); anything else is refused before
# the upstream sees it. PROXY_ADMIN_PATHS are served to staff users only.
PROXY_ALLOWED_PATHS = env_list(
    "PROXY_ALLOWED_PATHS", "models,chat/completions,completions,embeddings,responses,audio,images,moderations"
)
PROXY_ADMIN_PATHS = env_list("PROXY_ADMIN_PATHS")
# Sent upstream as OpenAI-Organization / OpenAI-Project when set; clients' own are never forwarded.
OPENAI_ORGANIZATION = env_str("OPENAI_ORGANIZATION")
OPENAI_PROJECT = env_str("OPENAI_PROJECT")
DEFAULT_MODEL = env_str("DEFAULT_MODEL", "gpt-4o-mini")
# Model aliases clients may ask for (the original API's gpt-3.5-turbo and gpt-4), as alias=model pairs.
MODEL_ALIASES = dict(
    pair.split("=", 1) for pair in env_list("MODEL_ALIASES", "gpt-3=gpt-3.5-turbo,gpt-4=gpt-4") if "=" in pair
)

# --- Budgets (proxy/usage/budgets.py) ---------------------------------------------------------------
# How long a process keeps a budget it read (a change in the admin or `manage.py budgets` takes this long
# to reach the other processes), how long a call's reservation lasts if its process dies, and the reply
# length reserved for a call that sets no max_tokens.
BUDGET_CACHE_SECONDS = env_int("BUDGET_CACHE_SECONDS", 5)
BUDGET_RESERVATION_SECONDS = env_int("BUDGET_RESERVATION_SECONDS", 600)
BUDGET_DEFAULT_MAX_TOKENS = env_int("BUDGET_DEFAULT_MAX_TOKENS", 4096)
# A model with no price (in TURBO_CONFIG or the shipped table) is counted at DEFAULT_PRICE, USD per 1M
# tokens ("input,output", or one number for both), so no model is free under a budget; with
# UNPRICED_MODELS=refuse a call to one is refused while a budget applies to its caller.
DEFAULT_PRICE = env_str("DEFAULT_PRICE", "10,30")
try:
    _default_price = [Decimal(part.strip()) for part in DEFAULT_PRICE.split(",")]
except InvalidOperation:
    _default_price = []
if len(_default_price) not in (1, 2) or not all(part.is_finite() and part >= 0 for part in _default_price):
    raise ImproperlyConfigured(f"DEFAULT_PRICE must be 'input,output' USD per 1M tokens, got {DEFAULT_PRICE!r}")
UNPRICED_MODELS = env_str("UNPRICED_MODELS", "default")
if UNPRICED_MODELS not in ("default", "refuse"):
    raise ImproperlyConfigured(f"UNPRICED_MODELS must be default or refuse, got {UNPRICED_MODELS!r}")

# --- Rate limits (proxy/usage/ratelimits.py) -------------------------------------------------------
# Requests and tokens per minute for every user, group and API key (0: no limit); a RateLimit in the
# admin, or a key's own rpm/tpm, takes the place of the default. Counted on Redis when REDIS_ADDRESS is
# set (shared by every process), else in each process.
RATE_LIMIT_USER_RPM = env_int("RATE_LIMIT_USER_RPM", 0)
RATE_LIMIT_USER_TPM = env_int("RATE_LIMIT_USER_TPM", 0)
RATE_LIMIT_GROUP_RPM = env_int("RATE_LIMIT_GROUP_RPM", 0)
RATE_LIMIT_GROUP_TPM = env_int("RATE_LIMIT_GROUP_TPM", 0)
RATE_LIMIT_KEY_RPM = env_int("RATE_LIMIT_KEY_RPM", 0)
RATE_LIMIT_KEY_TPM = env_int("RATE_LIMIT_KEY_TPM", 0)
# The "minute" of every limit, users' and deployments' (shorter or longer for tests and trials).
RATE_LIMIT_WINDOW_SECONDS = env_float("RATE_LIMIT_WINDOW_SECONDS", 60.0)
# How long a process keeps the overrides it read (RateLimit rows, a key's rpm/tpm).
RATE_LIMIT_CACHE_SECONDS = env_int("RATE_LIMIT_CACHE_SECONDS", 30)

# --- Chats ----------------------------------------------------------------------------------------
DEFAULT_CONTEXT = env_int("DEFAULT_CONTEXT", 10)
MAX_CONTEXT = env_int("MAX_CONTEXT", 20)
CONTEXT_MAX_CHARS = env_int("CONTEXT_MAX_CHARS", 16_000)
# A chat's model call is cut by tokens to its model's context window, keeping room for the reply:
# its max_tokens (or this, when it names none), at most half the window; below the floor it is refused.
CONTEXT_REPLY_TOKENS = env_int("CONTEXT_REPLY_TOKENS", 1024)
CONTEXT_REPLY_MIN_TOKENS = env_int("CONTEXT_REPLY_MIN_TOKENS", 32)
MAX_PROMPT_CHARS = env_int("MAX_PROMPT_CHARS", 32_000)
# How many times one prompt may go back to the model with tool results.
MAX_TOOL_ROUNDS = env_int("MAX_TOOL_ROUNDS", 5)
# How many times a reply that fails its response_format's JSON Schema is asked for again (proxy.structured).
STRUCTURED_RETRIES = max(0, env_int("STRUCTURED_RETRIES", 2))
# A reply's max_tokens when neither the chat's settings nor a program set one (0: no cap).
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 4096)
# Chat programs beside the built-in ones: comma-separated name=module.path:attribute pairs.
CHAT_PROGRAMS = env_list("CHAT_PROGRAMS")
for _pair in CHAT_PROGRAMS:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}=[A-Za-z_][\w.]*:[A-Za-z_]\w*", _pair):
        raise ImproperlyConfigured(f"CHAT_PROGRAMS: {_pair!r} is not name=module.path:attribute")
# How long one turn of a chat program may hold the chat before another prompt may take it over.
PROGRAM_TURN_SECONDS = env_int("PROGRAM_TURN_SECONDS", 600)
# Recorded steps (inputs and generated replies) a program may gather; then it is finished.
PROGRAM_MAX_STEPS = env_int("PROGRAM_MAX_STEPS", 2000)
STREAM_HEARTBEAT_SECONDS = env_int("STREAM_HEARTBEAT_SECONDS", 15)
STREAM_REPLAY_SECONDS = env_int("STREAM_REPLAY_SECONDS", 300)
STREAM_REPLAY_MAX = env_int("STREAM_REPLAY_MAX", 1000)
# Events a slow subscriber may have waiting in this process before it reads them back from the replay store.
STREAM_SUBSCRIBER_BUFFER = env_int("STREAM_SUBSCRIBER_BUFFER", 2000)
# How long the end of a reply (its save, then its final event) is retried while the database or Redis is away.
FINAL_SAVE_RETRY_SECONDS = env_int("FINAL_SAVE_RETRY_SECONDS", 30)
# A reply not stored within FINAL_SAVE_RETRY_SECONDS (members are told `storage_unavailable`) is still
# retried in the background this long; after that the sweeper ends it from the stream's record.
FINAL_SAVE_LATE_SECONDS = env_int("FINAL_SAVE_LATE_SECONDS", 3600)
# The sweeper (at start and every SWEEP_SECONDS) ends messages left `streaming` by a process that died.
SWEEP_SECONDS = env_int("SWEEP_SECONDS", 60)
# A running generation's alive mark in the cache lives this long, renewed every third of it; the sweeper
# ends a `streaming` message only after twice this with no mark.
GENERATION_ALIVE_SECONDS = env_int("GENERATION_ALIVE_SECONDS", 30)
# The /ws RPC endpoint: largest client frame, and requests one socket may have in flight.
WS_MAX_FRAME_BYTES = env_int("WS_MAX_FRAME_BYTES", 1024 * 1024)
# runserver (daphne) drops a socket whose frame passes its own limit (1 MiB) without a close frame; let
# frames through up to uvicorn's limit (16 MiB), so the consumer answers frame_too_large on both servers.
DAPHNE_WEBSOCKET_MAX_MESSAGE_SIZE = DAPHNE_WEBSOCKET_MAX_FRAME_SIZE = max(16 * 1024 * 1024, 2 * WS_MAX_FRAME_BYTES)
WS_MAX_IN_FLIGHT = env_int("WS_MAX_IN_FLIGHT", 8)
# On shutdown, how long generations still running may take before they are saved as interrupted.
SHUTDOWN_GRACE_SECONDS = env_int("SHUTDOWN_GRACE_SECONDS", 20)
# After draining, how long the server waits for other open calls (uvicorn in `make serve`, grpcserve).
SHUTDOWN_SERVER_SECONDS = env_int("SHUTDOWN_SERVER_SECONDS", 5)
# Where `manage.py grpcserve` listens (host:port).
GRPC_ADDRESS = env_str("GRPC_ADDRESS", "127.0.0.1:50051")

# --- Event log ------------------------------------------------------------------------------------
EVENT_CAPTURE_BODIES = env_bool("EVENT_CAPTURE_BODIES")
EVENT_BODY_MAX_BYTES = env_int("EVENT_BODY_MAX_BYTES", 4096)
EVENT_RETENTION_DAYS = env_int("EVENT_RETENTION_DAYS", 90)
EVENT_FLUSH_MS = env_int("EVENT_FLUSH_MS", 500)
EVENT_BATCH_SIZE = env_int("EVENT_BATCH_SIZE", 500)
EVENT_QUEUE_MAX = env_int("EVENT_QUEUE_MAX", 100_000)

# --- Metrics (turbo_site.core.metrics, GET /metrics) -------------------------------------------------
# /metrics answers a Bearer METRICS_TOKEN or a client address in METRICS_ALLOWED_IPS (addresses or
# networks); with neither set it is off (404) and nothing is measured.
METRICS_TOKEN = env_str("METRICS_TOKEN")
METRICS_ALLOWED_IPS = env_list("METRICS_ALLOWED_IPS")
# Several worker processes on one machine: a directory they share (prometheus-client's multiprocess mode).
METRICS_MULTIPROC_DIR = env_str("METRICS_MULTIPROC_DIR")

# --- Traces (turbo_site.core.tracing) --------------------------------------------------------------
# Off unless set (then OTLP over HTTP); the SDK reads the other standard OTEL_* variables itself.
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "turbo")
# Prompt and reply text in spans (off: spans carry counts and names only).
OTEL_CAPTURE_CONTENT = env_bool("OTEL_CAPTURE_CONTENT")

# --- i18n, static ---------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# The web app's own CSS and JavaScript (templates/static/turbo/), served like the admin's.
STATICFILES_DIRS = [BASE_DIR / "templates" / "static"]
# Production collects the static files (`manage.py collectstatic`, run by deploy/entrypoint.sh) into
# STATIC_ROOT: hashed names and .gz/.br copies, served by WhiteNoise (turbo_site/core/staticfiles.py) with a
# ten-year Cache-Control. Unset (`make run`, the suite), the files are served from the apps as they are.
STATIC_ROOT = env_str("STATIC_ROOT") or None
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_ROOT
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not STATIC_ROOT

# --- DRF and OpenAPI ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.auth.TokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "turbo_site.core.parsers.JSONParser",
        "turbo_site.core.parsers.LenientFormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "turbo_site.core.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Turbo API",
    "DESCRIPTION": "User accounts, groups, chats, live streaming and an OpenAI-compatible proxy.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # /api/docs/ loads Swagger UI from our own static files, so it works offline and loads nothing foreign.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "turbo_site.core.schema.add_schema_extras",
        "proxy.schema.add_proxy_paths",
        "chats.schema.add_chat_paths",
        "turbo_site.health.add_health_paths",
        "turbo_site.metrics_view.add_metrics_path",
        "turbo_site.graphql_server.add_graphql_path",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Secret query parameters (a WebSocket's ?token=) never reach a log line; asgi.py also puts this
    # filter on the servers' own loggers, which do not go through this handler.
    "filters": {"redact_secrets": {"()": "turbo_site.core.logs.RedactSecrets"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["redact_secrets"]}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # Named so that Django's default handlers on it (a console handler when DEBUG is on) are removed:
        # its records reach the root's handler once, not twice.
        "django": {"level": "INFO"},
        "django.request": {"level": "ERROR"},
        # One INFO line per upstream call is noise (and work) on the proxy's hot path.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
    },
}

# A bad TURBO_CONFIG stops Turbo here, in one line (turbo_site.core.turbo_config imports no app).
if TURBO_CONFIG:
    from turbo_site.core.turbo_config import ConfigError, load

    try:
        load(TURBO_CONFIG)
    except ConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from None
