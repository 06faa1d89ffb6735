#!/bin/sh
# The one start of every process of the production stack: compose.yaml, the systemd units (deploy/systemd/)
# and the nginx stack's test (turbo_site/tests/test_nginx_stack.py) all run it, through the same make targets.
#   deploy/entrypoint.sh migrate   once per release, before the servers: the static files collected into
#                                  STATIC_ROOT (when set), then the migrations
#   deploy/entrypoint.sh web       one web process on ADDRESS (`make serve`), not migrating again
#   deploy/entrypoint.sh grpc      the gRPC front on GRPC_ADDRESS (`make grpcserve`)
# Settings come from the environment (docs/configuration.md; docs/deploying.md lists what production sets).
set -eu
cd "$(dirname "$0")/.."
case "${1:-web}" in
    migrate) exec make --no-print-directory static migrate ;;
    web)
        export MIGRATE=0
        exec make --no-print-directory serve
        ;;
    grpc) exec make --no-print-directory grpcserve ;;
    *)
        echo "usage: $0 migrate|web|grpc" >&2
        exit 2
        ;;
esac
