"""`manage.py grpcserve`: Turbo's gRPC front (turbo_site/grpc.py) until SIGTERM or SIGINT.

It lives in turbo_site, beside the assembly it serves (turbo_site/grpc.py: every app's services).
"""

import asyncio
import signal

from django.conf import settings
from django.core.management.base import BaseCommand

from proxy.usage.tokens import encodings_warm
from turbo_site.core.startup import process_start
from turbo_site.grpc import SERVICE_NAMES, server_start, server_stop


class Command(BaseCommand):
    help = (
        "Serve the gRPC API (protos/turbo/v1/turbo.proto: turbo.v1.Completions, turbo.v1.Chats) with the "
        "grpc.health.v1 health service and server reflection, on GRPC_ADDRESS (default 127.0.0.1:50051). "
        "SIGTERM or SIGINT stops it gracefully: NOT_SERVING, running replies finish (SHUTDOWN_GRACE_SECONDS), "
        "open chat streams end with UNAVAILABLE, other calls get SHUTDOWN_SERVER_SECONDS."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--address", default=None, help=f"host:port to listen on (default GRPC_ADDRESS: {settings.GRPC_ADDRESS})"
        )

    def handle(self, *args, address: str | None, **options):
        process_start("grpc")  # log redaction, tracing, metrics: as the ASGI app has them
        encodings_warm()  # the token counts' encodings, built in a thread meanwhile: no call waits for them
        address = address or settings.GRPC_ADDRESS
        try:
            asyncio.run(self.serve(address))
        except OSError as exc:
            self.stderr.write(f"grpcserve: {exc}")
            raise SystemExit(1) from None

    async def serve(self, address: str) -> None:
        running = await server_start(address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        host = address.rsplit(":", 1)[0]
        self.stdout.write(f"gRPC on {host}:{running.port} ({', '.join(SERVICE_NAMES)}, health, reflection)")
        self.stdout.flush()
        await stop.wait()
        self.stdout.write("stopping: draining open calls")
        self.stdout.flush()
        await server_stop(running, grace=settings.SHUTDOWN_SERVER_SECONDS)
