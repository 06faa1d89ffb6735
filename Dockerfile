# Turbo's production image: the runtime requirements only, the static files collected at build, and
# deploy/entrypoint.sh as the start of every container (compose.yaml: migrate, web, grpc). The same make
# targets and entrypoint run in turbo_site/tests/test_nginx_stack.py; no Docker engine ran this file on the
# machines Turbo is developed on (docs/deploying.md says what was and was not run).
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /app --shell /usr/sbin/nologin turbo

WORKDIR /app
# The dependencies first, so that a code change reuses this layer.
COPY Makefile requirements.txt requirements-dev.txt ./
RUN make install REQUIREMENTS=requirements.txt PYTHON=python3.11

COPY . .
ENV DEBUG=0 \
    STATIC_ROOT=/app/static \
    ADDRESS=0.0.0.0:8000 \
    GRPC_ADDRESS=0.0.0.0:50051 \
    PYTHONUNBUFFERED=1
# collectstatic needs settings, not secrets: a key for this step only.
RUN SECRET_KEY=build-only-not-a-secret make static && chown -R turbo:turbo /app/static

USER turbo
EXPOSE 8000 50051
ENTRYPOINT ["deploy/entrypoint.sh"]
CMD ["web"]
