"""An OTLP/HTTP trace sink on loopback for the benchmarks: takes every export, decodes it, counts its spans.

    python -m bench.otlp_sink --port 4318 --out counts.json

Turbo pointed at it (`OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`) pays the whole cost of
tracing (spans made, batched, encoded and sent) against a collector that answers at once. After each
export, `--out` holds {"exports", "spans", "traces", "bytes"}; GET /count answers the same.
"""

import argparse
import gzip
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument(
        "--out", type=Path, default=None, help="a JSON file rewritten with the counts after each export"
    )
    args = parser.parse_args()
    counts = {"exports": 0, "spans": 0, "traces": 0, "bytes": 0}
    traces: set[bytes] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(200, json.dumps(counts).encode(), "application/json")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            encoding = self.headers.get("Content-Encoding", "")
            raw = (
                gzip.decompress(body)
                if encoding == "gzip"
                else zlib.decompress(body)
                if encoding == "deflate"
                else body
            )
            export = ExportTraceServiceRequest()
            export.ParseFromString(raw)
            spans = [
                span
                for resource_spans in export.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]
            with lock:
                traces.update(span.trace_id for span in spans)
                counts.update(
                    exports=counts["exports"] + 1,
                    spans=counts["spans"] + len(spans),
                    traces=len(traces),
                    bytes=counts["bytes"] + len(body),
                )
                if args.out is not None:
                    args.out.write_text(json.dumps(counts))
            self._answer(200, b"", "application/x-protobuf")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
