"""OpenTelemetry traces of inference requests, exported over OTLP/HTTP: where a slow request spent its time.

Off unless `--otlp-endpoint URL` (or OTEL_EXPORTER_OTLP_ENDPOINT) is set. Off, nothing of OpenTelemetry is imported
and the request path pays one `is None` test. On, each inference request is one trace (a child of the client's W3C
`traceparent`, where it sent one, sampled as the client says), with these spans:

    POST /v2/models/{name}/infer     SERVER: arrival to the last byte of the answer (route, status, model, version)
      receive                        the body read, decoded and validated against the model
      queue                          submitted to the model's workers, until its batch was cut (gateway outbox,
                                     channel, the worker's batching)
      batch                          the batch cut until its answer was back in the HTTP process (inputs prepared,
                                     run, split, sent); kiln.batch.requests / .items / .tokens, this request's tokens
        run                          the runtime's run of the batch (retries included)
      reply                          the answer encoded and sent

The spans are built once the answer is sent, from timestamps the path already records (the worker's Result carries
when its batch was cut and ran, serve.channel.Result), not carried through the batching loop: the worker and the
channel do no tracing work at all, and a span costs the HTTP process only when tracing is on. Every clock is
`time.time()` on one machine, so the worker's timestamps line up with the HTTP process's.

Why the SDK's BatchSpanProcessor and OTLP/HTTP (protobuf): spans leave in a background thread, in batches, and an
unreachable collector drops spans after its timeout, never a request. OTLP/HTTP needs no gRPC stack.

Front ends: HTTP's fast path (serve.routes) calls `begin` with the request's headers and `finish` after the reply;
a gRPC servicer does the same with its metadata (`begin(route, dict(metadata))`: the keys are lower-case there too),
or passes the metadata to InferenceService.call, which does it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from kiln.core.errors import RuntimeUnavailable

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_PATH = "/v1/traces"
INSTALL = "pip install 'kiln[tracing]'"


def endpoint_from(configured: str | None) -> str | None:
    """The OTLP/HTTP traces URL: --otlp-endpoint, else $OTEL_EXPORTER_OTLP_ENDPOINT (a base URL, as the SDK reads
    it: /v1/traces is added), else None (tracing off)."""
    base = configured or os.environ.get(ENV_ENDPOINT) or None
    if not base:
        return None
    if not base.startswith(("http://", "https://")):
        from kiln.core.errors import UsageError

        raise UsageError(f"--otlp-endpoint {base!r} is not an http:// or https:// URL; give the collector's OTLP/HTTP "
                         "address, e.g. http://127.0.0.1:4318")
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def require() -> None:
    """Refuses at start, in one line, a server told to trace without the SDK installed."""
    from importlib.util import find_spec

    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise RuntimeUnavailable(f"tracing (--otlp-endpoint or ${ENV_ENDPOINT}) needs the OpenTelemetry SDK and "
                                     f"its OTLP exporter, which this install lacks ({module}); {INSTALL}")


@dataclass(slots=True)
class RequestTrace:
    """One request's timestamps (time.time_ns()) as the path records them; the spans are made from it at the end."""

    route: str
    parent: Any  # the client's context (opentelemetry.context.Context), or None
    arrived: int
    parsed: int = 0
    submitted: int = 0
    answered: int = 0
    result: Any = None  # serve.channel.Result
    model: str | None = None
    version: str | None = None
    method: str = "POST"


class Tracing:
    """One server's tracer provider and exporter; made in the HTTP process (its export thread lives there)."""

    def __init__(self, endpoint: str, service_name: str = "kiln", exporter: Any = None) -> None:
        """`exporter`: an SDK SpanExporter in place of OTLP/HTTP to `endpoint` (tests)."""
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.endpoint = endpoint
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint, timeout=5)))
        self.tracer = self.provider.get_tracer("kiln.serve")
        self.propagator = TraceContextTextMapPropagator()
        self._trace = trace
        self._server = trace.SpanKind.SERVER

    def begin(self, route: str, carrier: dict[str, str] | None, method: str = "POST") -> RequestTrace:
        """A request arrived: `carrier` holds its `traceparent` (and `tracestate`), lower-case keys."""
        parent = self.propagator.extract(carrier) if carrier else None
        return RequestTrace(route, parent, time.time_ns(), method=method)

    def finish(self, record: RequestTrace, status: int) -> None:
        """The answer is sent: the request's spans, from its timestamps."""
        end = time.time_ns()
        attributes: dict[str, Any] = {"http.request.method": record.method, "http.route": record.route,
                                      "http.response.status_code": status}
        if record.model is not None:
            attributes["kiln.model"] = record.model
            attributes["kiln.model_version"] = record.version or ""
        root = self.tracer.start_span(f"{record.method} {record.route}", context=record.parent, kind=self._server,
                                      start_time=record.arrived, attributes=attributes)
        if status >= 500:
            root.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        inside = self._trace.set_span_in_context(root)
        parsed = record.parsed or end
        self._span("receive", inside, record.arrived, parsed)
        result = record.result
        reply_from = parsed
        if result is not None and record.submitted:
            cut = record.submitted + int(result.queue_s * 1e9)
            self._span("queue", inside, record.submitted, cut)
            batch_attributes = {"kiln.batch.requests": result.batch_requests, "kiln.batch.items": result.batch_items,
                                "kiln.batch.id": result.batch_id}
            if result.batch_tokens is not None:
                batch_attributes["kiln.batch.tokens"] = result.batch_tokens
            if result.tokens is not None:
                batch_attributes["kiln.request.tokens"] = result.tokens
            batch = self.tracer.start_span("batch", context=inside, start_time=cut, attributes=batch_attributes)
            if result.run_started:
                run_start = int(result.run_started * 1e9)
                self._span("run", self._trace.set_span_in_context(batch), run_start,
                           run_start + int(result.infer_s * 1e9))
            batch.end(end_time=record.answered)
            reply_from = record.answered
        self._span("reply", inside, reply_from, end)
        root.end(end_time=end)

    def _span(self, name: str, context, start: int, end: int) -> None:
        self.tracer.start_span(name, context=context, start_time=start).end(end_time=max(start, end))

    def shutdown(self) -> None:
        """Sends what is still buffered (the server is stopping)."""
        self.provider.shutdown()
