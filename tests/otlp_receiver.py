"""An OTLP/HTTP traces receiver on 127.0.0.1 for tests and benchmarks (tests/test_tracing.py,
benchmarks/tracing_overhead.py): the opentelemetry-proto messages, parsed as a collector would."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from server_process import free_port


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint on 127.0.0.1: parses each ExportTraceServiceRequest and keeps its spans
    as dicts (ids as hex)."""

    def __init__(self, keep: bool = True) -> None:
        """`keep`: every span as a dict in `spans`; else only their count in `count` (a benchmark's receiver)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict] = []
        self.count = 0
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver.paths.append(self.path)
                receiver.count += sum(len(scope.spans) for resource in request.resource_spans
                                      for scope in resource.scope_spans)
                for resource in request.resource_spans if keep else ():
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append({
                                "name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(), "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano, "service": service, "kind": span.kind,
                                "attributes": {a.key: _value(a.value) for a in span.attributes}})
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None
