# Every install step lives here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:8080

.PHONY: install browser-deps env demo run serve grpcserve protos test test-pg lint format bench clean

$(BIN)/activate:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv

$(VENV)/.installed: $(BIN)/activate requirements.txt requirements-dev.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements-dev.txt
	@# Byte-compile the dependencies once: with PYTHONDONTWRITEBYTECODE set, every process (server,
	@# subprocess in a test, benchmark) would otherwise compile them again (seconds each).
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $@

install: $(VENV)/.installed

# The browser tests (*/tests/test_web_browser.py) drive Debian's headless chromium through its chromedriver.
# Installed only when missing; needs root (as on CI), otherwise it says what to run.
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "the browser tests need chromium and chromedriver: run as root (or with sudo):" >&2; \
		echo "  apt-get install -y --no-install-recommends chromium chromium-driver" >&2; \
		exit 1; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver

# A local install's secrets: a generated SECRET_KEY in a git-ignored .env that settings read (the
# environment wins), so `manage.py ...` works as printed. Never overwritten; production sets its own.
ENV_FILE ?= .env
env: $(ENV_FILE)
$(ENV_FILE):
	@umask 077 && $(PYTHON) -c 'import secrets; print("SECRET_KEY=" + secrets.token_urlsafe(50))' > $@
	@echo "wrote a generated SECRET_KEY to $@"

run: install $(ENV_FILE)
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py migrate --noinput
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py runserver $(ADDRESS)

# Try the whole product without a provider key: a fake OpenAI-compatible upstream (manage.py fakellm)
# on FAKE_PORT, and Turbo (as `make run`) pointed at it. "echo: some words" is answered "some words".
FAKE_PORT ?= 8081
demo: install $(ENV_FILE)
	@$(BIN)/python manage.py fakellm --port $(FAKE_PORT) & trap "kill $$! 2>/dev/null" EXIT INT TERM; \
		OPENAI_API_URL=http://127.0.0.1:$(FAKE_PORT)/v1 OPENAI_API_KEY=sk-demo-not-a-real-key $(MAKE) --no-print-directory run

# Production-style: uvicorn with lifespan (graceful shutdown on SIGTERM), listening on ADDRESS.
# Set SECRET_KEY (and DEBUG stays off). Client addresses come from TRUSTED_PROXIES, not uvicorn.
serve: install
	$(BIN)/python manage.py migrate --noinput
	@# Metrics of several workers (METRICS_MULTIPROC_DIR): a new server starts from an empty directory.
	@if [ -n "$$METRICS_MULTIPROC_DIR" ]; then mkdir -p "$$METRICS_MULTIPROC_DIR" && rm -f "$$METRICS_MULTIPROC_DIR"/*.db; fi
	$(BIN)/python -m uvicorn turbo_site.asgi:application --host $(word 1,$(subst :, ,$(ADDRESS))) \
		--port $(word 2,$(subst :, ,$(ADDRESS))) --loop uvloop --http httptools --ws-per-message-deflate false \
		--lifespan on --no-proxy-headers --no-access-log --timeout-graceful-shutdown $${SHUTDOWN_SERVER_SECONDS:-5}

# The gRPC front (protos/turbo/v1/turbo.proto) on GRPC_ADDRESS (default 127.0.0.1:50051), graceful on SIGTERM.
# A process of its own beside `make serve` (same settings, database and Redis): run both, e.g.
#   make serve & make grpcserve
grpcserve: install
	$(BIN)/python manage.py grpcserve

# Regenerate protos/turbo/v1/turbo_pb2*.py from turbo.proto (checked in; a test fails when they drift).
protos: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/turbo/v1/turbo.proto

# The project's own modules, byte-compiled before a run: with PYTHONDONTWRITEBYTECODE set, each of the
# suite's subprocesses (servers, manage.py commands) would otherwise compile them again.
PROJECT_CODE := manage.py conftest.py accounts groups chats proxy turbo_site protos bench

test: install
	@$(BIN)/python -m compileall -q -j 0 $(PROJECT_CODE) >/dev/null || true
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The second leg: the same suite on Postgres + Redis.
test-pg: install
	@$(BIN)/python -m compileall -q -j 0 $(PROJECT_CODE) >/dev/null || true
	DB_ADDRESS=$${DB_ADDRESS:-postgresql://postgres@127.0.0.1:5432/test} \
	REDIS_ADDRESS=$${REDIS_ADDRESS:-redis://127.0.0.1:6379/0} \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (not tests), each printing its table and targets and writing JSON to bench/results/:
# proxy overhead (PEERS=litellm adds LiteLLM, SERVERS=uvicorn,daphne,gunicorn compares servers),
# fan-out, prompt cost, soak, gRPC streaming against /v1. ARGS=--quick for a short run of each. See bench/README.md.
bench: install
	$(BIN)/python -m bench.proxy_overhead $(if $(PEERS),--peers $(PEERS)) $(if $(SERVERS),--servers $(SERVERS)) $(ARGS)
	$(BIN)/python -m bench.fanout $(ARGS)
	$(BIN)/python -m bench.prompt_cost $(ARGS)
	$(BIN)/python -m bench.soak $(ARGS)
	$(BIN)/python -m bench.grpc_stream $(ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
