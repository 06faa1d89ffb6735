# Every install step lives here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:8080
# What `make install` installs: the runtime and the test tools; a production image installs requirements.txt alone.
REQUIREMENTS ?= requirements-dev.txt

.PHONY: help install browser-deps nginx-deps js-deps env demo run migrate static serve grpcserve protos test test-pg lint format docs bench clean

# `make help` (and plain `make`): each target with its `## ` line.
help:
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/activate:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	@echo "== creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "== installing the installer (uv)"
	$(BIN)/pip install --progress-bar on --upgrade pip uv

$(VENV)/.installed: $(BIN)/activate requirements.txt requirements-dev.txt
	@echo "== installing the requirements (first time: about a minute)"
	$(BIN)/uv pip install --python $(BIN)/python -r $(REQUIREMENTS)
	@echo "== byte-compiling the dependencies"
	@# Byte-compile the dependencies once: with PYTHONDONTWRITEBYTECODE set, every process (server,
	@# subprocess in a test, benchmark) would otherwise compile them again (seconds each).
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $@

install: $(VENV)/.installed ## create .venv and install the pinned requirements (runtime + tests)

# The browser tests (*/tests/test_web_browser.py) drive Debian's headless chromium through its chromedriver.
# Installed only when missing; needs root (as on CI), otherwise it says what to run.
browser-deps: ## install Debian's chromium + chromedriver for the browser tests (as root)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "the browser tests need chromium and chromedriver: run as root (or with sudo):" >&2; \
		echo "  apt-get install -y --no-install-recommends chromium chromium-driver" >&2; \
		exit 1; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver

# The production stack's test (turbo_site/tests/test_nginx_stack.py) runs Debian's nginx with deploy/nginx/turbo.conf.
nginx-deps: ## install Debian's nginx for the production stack's test (as root)
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "the nginx stack test needs nginx: run as root (or with sudo): apt-get install -y nginx-light" >&2; \
		exit 1; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light

# The documentation's JavaScript examples run through their real clients (openai, eventsource, ws, graphql-ws),
# pinned in testing/js/package-lock.json; the example runner (turbo_site/tests/test_docs_examples.py)
# runs them with Node.js. Node and npm: Debian's nodejs and npm (as root when missing, as browser-deps).
JS_DEPS := testing/js
js-deps: ## install the JavaScript clients the docs' examples use (needs node and npm)
	@if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "the docs' JavaScript examples need node and npm: run as root (or with sudo):" >&2; \
			echo "  apt-get install -y --no-install-recommends nodejs npm" >&2; \
			exit 1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm; \
	fi
	@echo "== installing the JavaScript clients of the docs' examples into $(JS_DEPS)/node_modules"
	npm ci --prefix $(JS_DEPS) --no-audit --no-fund

# A local install's secrets: a generated SECRET_KEY in a git-ignored .env that settings read (the
# environment wins), so `manage.py ...` works as printed. Never overwritten; production sets its own.
ENV_FILE ?= .env
env: $(ENV_FILE) ## write .env with a generated SECRET_KEY (never overwritten)
$(ENV_FILE):
	@umask 077 && $(PYTHON) -c 'import secrets; print("SECRET_KEY=" + secrets.token_urlsafe(50))' > $@
	@echo "wrote a generated SECRET_KEY to $@"

run: install $(ENV_FILE) ## development server on ADDRESS (default 127.0.0.1:8080), DEBUG=1
	@$(PYTHON) -c "$$PORT_CHECK" $(ADDRESS)
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py migrate --noinput
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py runserver $(ADDRESS)

# A port already taken is said at once (exit 1), not found out after the install as "Address already in use".
define PORT_CHECK
import socket, sys
for address in sys.argv[1:]:
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host or "127.0.0.1", int(port)))
        except OSError:
            sys.exit(f"{address} is already in use (another `make run` or `make demo`?): stop it, or pick another, e.g. ADDRESS=127.0.0.1:8090 FAKE_PORT=8091")
endef
export PORT_CHECK

# Try the whole product without a provider key: a fake OpenAI-compatible upstream (manage.py fakellm)
# on FAKE_PORT, and Turbo (as `make run`) pointed at it. "echo: some words" is answered "some words".
# demo.env names the fake for commands run beside it: `set -a; . ./demo.env; set +a` in another shell.
FAKE_PORT ?= 8081
DEMO_ENV := OPENAI_API_URL=http://127.0.0.1:$(FAKE_PORT)/v1 OPENAI_API_KEY=sk-demo-not-a-real-key
# DEMO_ENV_FILE: where demo.env goes (the docs' example runner keeps its own out of the checkout).
DEMO_ENV_FILE ?= demo.env
DEMO_ENV_SOURCE := $(if $(filter /%,$(DEMO_ENV_FILE)),$(DEMO_ENV_FILE),./$(DEMO_ENV_FILE))
demo: install $(ENV_FILE) ## `make run` pointed at a fake upstream on FAKE_PORT (no provider key needed)
	@$(PYTHON) -c "$$PORT_CHECK" $(ADDRESS) 127.0.0.1:$(FAKE_PORT)
	@printf '%s\n' $(DEMO_ENV) > $(DEMO_ENV_FILE)
	@echo "wrote $(DEMO_ENV_FILE): in another shell, 'set -a; . $(DEMO_ENV_SOURCE); set +a' points manage.py and make grpcserve at the fake"
	@$(BIN)/python manage.py fakellm --port $(FAKE_PORT) & trap "kill $$! 2>/dev/null" EXIT INT TERM; \
		$(DEMO_ENV) $(MAKE) --no-print-directory run

# Production (docs/deploying.md): `make static migrate` once per release, then any number of `make serve MIGRATE=0`
# (deploy/entrypoint.sh does this for compose.yaml, the systemd units and the nginx stack's test).
migrate: install ## apply the database migrations
	$(BIN)/python manage.py migrate --noinput

static: install ## collect the static files into STATIC_ROOT (hashed names, gzip) for WhiteNoise
	@if [ -z "$$STATIC_ROOT" ]; then echo "STATIC_ROOT is not set: nothing to collect (files are served from the apps)"; exit 0; fi; \
	$(BIN)/python manage.py collectstatic --noinput -v0 && echo "collected the static files into $$STATIC_ROOT"

# Production-style: uvicorn with lifespan (graceful shutdown on SIGTERM), listening on ADDRESS.
# Set SECRET_KEY (and DEBUG stays off). Client addresses come from TRUSTED_PROXIES, not uvicorn.
# It migrates first, unless MIGRATE=0 (several processes: one `make migrate` before them all).
serve: install ## production server (uvicorn) on ADDRESS; needs SECRET_KEY (MIGRATE=0: skip migrating)
	@if [ "$${MIGRATE:-1}" != 0 ]; then $(MAKE) --no-print-directory migrate; fi
	@# Metrics of several workers (METRICS_MULTIPROC_DIR): a new server starts from an empty directory.
	@if [ -n "$$METRICS_MULTIPROC_DIR" ]; then mkdir -p "$$METRICS_MULTIPROC_DIR" && rm -f "$$METRICS_MULTIPROC_DIR"/*.db; fi
	exec $(BIN)/python -m uvicorn turbo_site.asgi:application --host $(word 1,$(subst :, ,$(ADDRESS))) \
		--port $(word 2,$(subst :, ,$(ADDRESS))) --loop uvloop --http httptools --ws-per-message-deflate false \
		--lifespan on --no-proxy-headers --no-access-log --timeout-graceful-shutdown $${SHUTDOWN_SERVER_SECONDS:-5}

# The gRPC front (protos/turbo/v1/turbo.proto) on GRPC_ADDRESS (default 127.0.0.1:50051), graceful on SIGTERM.
# A process of its own beside `make serve` (same settings, database and Redis): run both, e.g.
#   make serve & make grpcserve
grpcserve: install ## the gRPC front on GRPC_ADDRESS (default 127.0.0.1:50051)
	$(BIN)/python manage.py grpcserve

# Regenerate protos/turbo/v1/turbo_pb2*.py from turbo.proto (checked in; a test fails when they drift).
protos: install ## regenerate protos/turbo/v1/turbo_pb2*.py
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/turbo/v1/turbo.proto

# The project's own modules, byte-compiled before a run: with PYTHONDONTWRITEBYTECODE set, each of the
# suite's subprocesses (servers, manage.py commands) would otherwise compile them again.
PROJECT_CODE := manage.py conftest.py accounts groups chats proxy turbo_site protos bench testing

# TEST_WORKERS=N runs the suite in N processes at once (pytest-xdist). A test file stays on one worker (its
# module fixtures are made once); each worker has its own test database (SQLite file, or Postgres
# test_<db>_gwK) and its own Redis database (REDIS_ADDRESS's + K, turbo_site/test_settings.py). On this
# 2-core machine with both legs at once (.ci/run), the same tree took CI 22:42 with 4 workers a leg and
# 24:38 in one process a leg (2026-12-07): little better, since there the legs are mostly CPU-bound and
# every worker pays Django's start-up, its own database and its own session servers again.
# Leg 1 alone on a quiet machine with 4 workers: 9:04 (2026-12-07), then 4:50 once the suite stopped waiting
# out timeouts (the same CPU, ~8.5 min): the files are taken in collection order, which conftest.py sets, the
# slowest first (SLOWEST_FILES). Once the API tests ran in process (one transaction each, rolled back, not
# flushed: docs/layout.md), each leg alone on a quiet machine: leg 1 3:32, leg 2 4:04 (2026-12-07).
# TEST_WORKERS=0: one process.
# PYTEST_ARGS come last, so `make test PYTEST_ARGS="-k foo"` or `PYTEST_ARGS="-n 0 -x"` do the obvious thing.
TEST_WORKERS ?= 4
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),-n 0,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: install ## the suite on the embedded defaults (SQLite, in-memory), in TEST_WORKERS processes
	@$(BIN)/python -m compileall -q -j 0 $(PROJECT_CODE) >/dev/null || true
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The second leg: the same suite on Postgres + Redis.
test-pg: install ## the suite on Postgres + Redis (DB_ADDRESS, REDIS_ADDRESS), in TEST_WORKERS processes
	@$(BIN)/python -m compileall -q -j 0 $(PROJECT_CODE) >/dev/null || true
	DB_ADDRESS=$${DB_ADDRESS:-postgresql://postgres@127.0.0.1:5432/test} \
	REDIS_ADDRESS=$${REDIS_ADDRESS:-redis://127.0.0.1:6379/0} \
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Benchmarks (not tests), each printing its table and targets and writing JSON to bench/results/:
# proxy overhead (PEERS=litellm adds LiteLLM, SERVERS=uvicorn,daphne,gunicorn compares servers),
# fan-out, prompt cost, soak, gRPC streaming against /v1. ARGS=--quick for a short run of each. See bench/README.md.
# The documentation site from docs/ (mkdocs.yml): strict (a broken link or anchor fails), into site/;
# open site/index.html, no server needed.
docs: install ## build the documentation site into site/ (strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: install ## the benchmarks (see bench/README.md)
	$(BIN)/python -m bench.proxy_overhead $(if $(PEERS),--peers $(PEERS)) $(if $(SERVERS),--servers $(SERVERS)) $(ARGS)
	$(BIN)/python -m bench.fanout $(ARGS)
	$(BIN)/python -m bench.prompt_cost $(ARGS)
	$(BIN)/python -m bench.soak $(ARGS)
	$(BIN)/python -m bench.grpc_stream $(ARGS)

# The import contracts (pyproject.toml, [tool.importlinter]): the layering docs/layout.md draws, no cycles.
lint: install ## ruff format --check, ruff check and the import contracts (lint-imports)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

format: install ## ruff format and ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## remove .venv, caches, the docs site and the JavaScript clients
	rm -rf $(VENV) .pytest_cache site $(JS_DEPS)/node_modules
