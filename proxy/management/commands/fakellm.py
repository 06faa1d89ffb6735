"""`manage.py fakellm`: an OpenAI-compatible stand-in, to try Turbo without a provider key."""

import signal
import socket

import uvicorn
from django.core.management.base import BaseCommand

from proxy import fakellm


class Command(BaseCommand):
    help = (
        "Serve a fake OpenAI-compatible upstream until stopped: /v1/models, /v1/chat/completions (plain and "
        "streamed; a prompt 'echo: words' is answered with 'words'), /v1/embeddings. Point Turbo at it with "
        "OPENAI_API_URL=http://HOST:PORT/v1 (`make demo` does)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8081, help="port to listen on (default 8081)")

    def handle(self, *args, host: str, port: int, **options):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
            listener.listen(128)  # from here a client is queued until the server takes it
        except OSError as exc:
            listener.close()
            self.stderr.write(f"fakellm: cannot listen on {host}:{port}: {exc.strerror or exc}")
            raise SystemExit(1) from None
        self.stdout.write(
            f"fake OpenAI-compatible upstream on http://{host}:{listener.getsockname()[1]}/v1 (Ctrl-C stops it)"
        )
        self.stdout.flush()
        # uvicorn stops on SIGINT and SIGTERM, then raises the signal again for the handler it found: this
        # one, so that the command ends with status 0 rather than dying of the signal.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        config = uvicorn.Config(fakellm.app, log_level="warning", lifespan="off", interface="asgi3", ws="none")
        uvicorn.Server(config).run(sockets=[listener])
