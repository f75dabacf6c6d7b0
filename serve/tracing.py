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

The spans are built after the answer is sent, from timestamps the path already records (the worker's Result
carries when its batch was cut and ran, serve.channel.Result), not carried through the batching loop: the worker
and the channel do no tracing work at all. Every clock is `time.time()` on one machine, so the worker's timestamps
line up with the HTTP process's.

Where the spans are made: in a helper process, not the HTTP process. The SDK costs about 25 us per span to create
and more to encode for OTLP, all of it holding the GIL: made in the HTTP process, six spans a request took digits
at concurrency 32 from 2,284 to 1,270 req/s (2 vCPUs). So the HTTP process only records each request's timestamps
as one row, and a small thread sends the rows in batches (JSON) down a pipe; the helper builds the spans (the SDK's
ReadableSpan), batches and exports them (its BatchSpanProcessor and OTLP/HTTP exporter). When the helper falls
behind, rows past MAX_PENDING are dropped (counted in a log line at the end), never a request held up.

OTLP/HTTP (protobuf) rather than OTLP/gRPC: it needs no gRPC stack; an unreachable collector costs the helper its
export timeout, never a request.

Front ends: HTTP's fast path (serve.routes) calls `begin` with the request's headers and `finish` after the reply;
a gRPC servicer does the same with its metadata (`begin(route, dict(metadata))`: the keys are lower-case there too),
or passes the metadata to InferenceService.call, which does it.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

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
    """One request's timestamps (time.time_ns()) as the path records them; its spans are made from them later."""

    route: str
    carrier: dict[str, str] | None  # the client's traceparent / tracestate, as sent
    arrived: int
    parsed: int = 0
    submitted: int = 0
    answered: int = 0
    result: Any = None  # serve.channel.Result
    model: str | None = None
    version: str | None = None
    method: str = "POST"

    def row(self, status: int, end: int) -> tuple:
        """What crosses to the helper, as JSON: plain values only (a Result's outputs stay behind), so the helper
        unpickles nothing."""
        result = self.result
        timings = None if result is None else (result.queue_s, result.infer_s, result.run_started,
                                               result.batch_requests, result.batch_items, result.batch_id,
                                               result.tokens, result.batch_tokens)
        return (self.route, self.method, self.carrier, self.arrived, self.parsed, self.submitted, self.answered, end,
                status, self.model, self.version, timings)


FLUSH_S = 0.05  # the sender thread's beat: records leave at most this long after their answer
MAX_PENDING = 65536  # records waiting for the pipe at most; past it the helper is behind and new ones are dropped


class Tracing:
    """The HTTP process's side: records each request's timestamps and sends them to the span helper process."""

    def __init__(self, endpoint: str, service_name: str = "kiln") -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.endpoint = endpoint
        receive, self._send = context.Pipe(duplex=False)
        self.process = context.Process(target=_helper_main, args=(receive, endpoint, service_name), daemon=True,
                                       name="kiln-trace-export")
        self.process.start()
        receive.close()
        self.pending: collections.deque[tuple] = collections.deque()  # append and popleft: safe across threads
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sender, daemon=True, name="kiln-trace-sender")
        self._thread.start()

    def begin(self, route: str, carrier: dict[str, str] | None, method: str = "POST") -> RequestTrace:
        """A request arrived: `carrier` holds its `traceparent` (and `tracestate`), lower-case keys."""
        return RequestTrace(route, carrier or None, time.time_ns(), method=method)

    def finish(self, record: RequestTrace, status: int) -> None:
        """The answer is sent: the request's record joins the next batch for the helper."""
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append(record.row(status, time.time_ns()))

    def _sender(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        pending = self.pending
        batch = [pending.popleft() for _ in range(len(pending))]
        if batch:
            try:
                self._send.send_bytes(orjson.dumps(batch))
            except (OSError, ValueError):  # the helper is gone: tracing stops, serving goes on
                self.dropped += len(batch)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Sends what is left, tells the helper to export it and stop, and waits for it."""
        self._stop.set()
        self._thread.join(timeout_s)
        try:
            self._send.send_bytes(b"")  # the end
        except (OSError, ValueError):
            pass
        self._send.close()
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
        if self.dropped:
            print(f"kiln: warning: tracing: {self.dropped} request traces were dropped (the span exporter fell "
                  "behind or stopped)", flush=True)


def _helper_main(receive, endpoint: str, service_name: str) -> None:
    """The span helper process: builds each record's spans with the SDK and exports them, until told to stop."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops it (a Ctrl-C or SIGTERM reaches the whole group)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ...and its last spans go out when the HTTP process says so
    builder = SpanBuilder(OTLPSpanExporter(endpoint=endpoint, timeout=5), service_name)
    try:
        while True:
            try:
                data = receive.recv_bytes()
            except (EOFError, OSError):
                break
            if not data:
                break
            for row in orjson.loads(data):
                builder.emit(row)
    finally:
        builder.shutdown()


class SpanBuilder:
    """Makes a request's spans from its record as the SDK's own finished spans (opentelemetry.sdk.trace.ReadableSpan,
    sampled as the parent says, ids from the SDK's generator) and hands them to its BatchSpanProcessor and exporter.

    Why not `tracer.start_span(...).end()`: a span is made here after the fact, complete, so the live-span machinery
    (context lookups, sampler, attribute cleaning, locks) has nothing to do; built directly, the helper spends about
    a fifth of the CPU per request."""

    def __init__(self, exporter, service_name: str = "kiln") -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("kiln.serve")
        # A deep queue: a burst (6 spans a request) waits for the export thread rather than being dropped.
        self.processor = BatchSpanProcessor(exporter, max_queue_size=1 << 16)
        self.propagator = TraceContextTextMapPropagator()
        self.ids = RandomIdGenerator()
        self._trace = trace
        self._span_type = ReadableSpan
        self._sampled = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        self._server = trace.SpanKind.SERVER
        self._internal = trace.SpanKind.INTERNAL
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._unset = trace.Status(trace.StatusCode.UNSET)

    def _parent(self, carrier: dict[str, str] | None):
        """The client's span context, or None (a new trace); False where the client says not to sample."""
        if not carrier:
            return None
        parent = self._trace.get_current_span(self.propagator.extract(carrier)).get_span_context()
        if not parent.is_valid:
            return None
        return parent if parent.trace_flags.sampled else False

    def emit(self, row: tuple) -> None:
        """One request's spans (the module docstring's tree), under the client's traceparent where it sent one."""
        route, method, carrier, arrived, parsed, submitted, answered, end, status, model, version, timings = row
        parent = self._parent(carrier)
        if parent is False:
            return
        trace_id = parent.trace_id if parent is not None else self.ids.generate_trace_id()
        attributes: dict[str, Any] = {"http.request.method": method, "http.route": route,
                                      "http.response.status_code": status}
        if model is not None:
            attributes["kiln.model"] = model
            attributes["kiln.model_version"] = version or ""
        root = self._span(f"{method} {route}", trace_id, parent, arrived, end, attributes, self._server,
                          self._error if status >= 500 else self._unset)
        parsed = parsed or end
        self._span("receive", trace_id, root, arrived, parsed)
        reply_from = parsed
        if timings is not None and submitted:
            queue_s, infer_s, run_started, batch_requests, batch_items, batch_id, tokens, batch_tokens = timings
            cut = submitted + int(queue_s * 1e9)
            self._span("queue", trace_id, root, submitted, cut)
            batch_attributes = {"kiln.batch.requests": batch_requests, "kiln.batch.items": batch_items,
                                "kiln.batch.id": batch_id}
            if batch_tokens is not None:
                batch_attributes["kiln.batch.tokens"] = batch_tokens
            if tokens is not None:
                batch_attributes["kiln.request.tokens"] = tokens
            batch = self._span("batch", trace_id, root, cut, answered, batch_attributes)
            if run_started:
                run_start = int(run_started * 1e9)
                self._span("run", trace_id, batch, run_start, run_start + int(infer_s * 1e9))
            reply_from = answered
        self._span("reply", trace_id, root, reply_from, end)

    def _span(self, name: str, trace_id: int, parent, start: int, end: int, attributes: dict | None = None,
              kind=None, status=None):
        """A finished span, handed to the processor; its context (the parent of the spans under it)."""
        context = self._trace.SpanContext(trace_id, self.ids.generate_span_id(), False, self._sampled)
        span = self._span_type(name, context, parent, self.resource, attributes or {}, kind=kind or self._internal,
                               status=status or self._unset, start_time=start, end_time=max(start, end),
                               instrumentation_scope=self.scope)
        self.processor.on_end(span)
        return context

    def shutdown(self) -> None:
        """Exports what is still buffered."""
        self.processor.shutdown()
