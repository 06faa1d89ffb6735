"""`manage.py fakellm`: an OpenAI-compatible stand-in, to try Turbo without a provider key."""

import signal
import threading

from django.core.management.base import BaseCommand

from turbo_site.testing.fake_upstream import FakeUpstream


class Command(BaseCommand):
    help = (
        "Serve a fake OpenAI-compatible upstream (the one the test suite uses) until stopped: /v1/models, "
        "/v1/chat/completions (plain and streamed; a prompt 'echo: words' is answered with 'words'), "
        "/v1/embeddings. Point Turbo at it with OPENAI_API_URL=http://HOST:PORT/v1 (`make demo` does)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8081, help="port to listen on (default 8081)")

    def handle(self, *args, host: str, port: int, **options):
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            fake = FakeUpstream(host=host, port=port).start()
        except OSError as exc:
            self.stderr.write(f"fakellm: cannot listen on {host}:{port}: {exc.strerror or exc}")
            raise SystemExit(1) from None
        self.stdout.write(f"fake OpenAI-compatible upstream on {fake.url}/v1 (Ctrl-C stops it)")
        self.stdout.flush()
        try:
            stop.wait()
        finally:
            fake.stop()
