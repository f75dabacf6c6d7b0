"""Prometheus metrics, written by hand in the text exposition format (no extra dependency).

All figures live in the HTTP process: the worker reports each request's queue time, inference
time and batch size with its answer, so one registry sees everything and `/metrics` needs no
cross-process aggregation. Average batch size = kiln_batch_size_sum / kiln_batch_size_count.

Requests that reach the runtime = kiln_batch_size_sum; those dropped at their deadline before reaching it =
kiln_requests_expired_total; those that ran but finished after their client had its 504 = kiln_answers_late_total.
The connection layer (serve.connections) counts what it closes or refuses below the app in
kiln_connections_closed_total, by reason.

Text models: kiln_batch_tokens is the positions each batch computed (rows x its longest row, padding included);
kiln_batch_tokens_real_total and kiln_batch_tokens_padded_total count real and computed positions, and
kiln_batch_padding_waste is their ratio (padded / real: 1.0 is no padding at all).
"""

from __future__ import annotations

import collections
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts: dict[tuple, list[int]] = {}
        self.sums: dict[tuple, float] = {}

    def observe(self, value: float, labels: tuple = ()) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

    def render(self, label_names: tuple = ()) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, counts in sorted(self.counts.items()):
            base = ",".join(f'{k}="{v}"' for k, v in zip(label_names, labels))
            sep = "," if base else ""
            for bound, count in zip(self.buckets, counts):
                lines.append(f'{self.name}_bucket{{{base}{sep}le="{bound}"}} {count}')
            lines.append(f'{self.name}_bucket{{{base}{sep}le="+Inf"}} {counts[-1]}')
            suffix = f"{{{base}}}" if base else ""
            lines.append(f"{self.name}_sum{suffix} {self.sums[labels]:.6f}")
            lines.append(f"{self.name}_count{suffix} {counts[-1]}")
        return lines


class Metrics:
    """Every figure of one server. Per-model series carry a `model` label: a server may serve several models, and
    each model's batches, queue and drops are its own (ModelMetrics records into them)."""

    def __init__(self, info: dict[str, dict[str, str]] | None = None) -> None:
        self.info = {model: dict(labels) for model, labels in (info or {}).items()}  # model -> kiln_info's labels
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.latency = Histogram("kiln_request_duration_seconds", "Time from request to response, by route and "
                                 "model.", LATENCY_BUCKETS)
        self.queue = Histogram("kiln_queue_duration_seconds", "Time a request waited for the inference worker.",
                               LATENCY_BUCKETS)
        self.inference = Histogram("kiln_inference_duration_seconds", "Runtime time per batch.",
                                   LATENCY_BUCKETS)
        self.batch_size = Histogram("kiln_batch_size", "Requests per batch the worker ran, observed once per batch.",
                                    BATCH_BUCKETS)
        self.batch_items = Histogram("kiln_batch_items", "Items per batch the worker ran, observed once per batch.",
                                     BATCH_BUCKETS)
        self.batch_tokens = Histogram("kiln_batch_tokens", "Positions per text batch the worker ran (rows x its "
                                      "longest row, padding included), observed once per batch.", TOKEN_BUCKETS)
        self.tokens_real: dict[str, int] = {}  # model -> real tokens of the text batches run
        self.tokens_padded: dict[str, int] = {}  # model -> positions those batches computed
        self._seen_batches: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self.in_flight = 0
        self.expired: dict[tuple[str, str], int] = {}  # (model, where a request was dropped at its deadline) -> count
        self.late: dict[str, int] = {}  # model -> answers computed after their deadline
        self.connections_open = 0
        self.connections_closed: dict[str, int] = {}  # why the connection layer closed or refused -> count

    def model(self, name: str) -> ModelMetrics:
        """The recorder one model's gateway writes into."""
        with self._lock:
            for stage in ("gateway", "worker"):
                self.expired.setdefault((name, stage), 0)
            self.late.setdefault(name, 0)
        return ModelMetrics(self, name)

    def record_request(self, route: str, method: str, status: int, seconds: float, model: str = "") -> None:
        """`model`: the served model the request named (empty where it named none: health, metrics, unknown)."""
        with self._lock:
            key = (route, method, str(status), model)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.observe(seconds, (route, model))

    def record_inference(self, model: str, queue_s: float, infer_s: float, batch_requests: int, batch_items: int,
                         batch_id: str, batch_tokens: int | None = None, batch_positions: int | None = None) -> None:
        """Queue time per request; inference time, batch sizes and (text models) tokens once per batch (its first
        answer)."""
        with self._lock:
            self.queue.observe(queue_s, (model,))
            key = (model, batch_id)
            if key in self._seen_batches:
                return
            self._seen_batches[key] = None
            if len(self._seen_batches) > 4096:
                self._seen_batches.popitem(last=False)
            self.inference.observe(infer_s, (model,))
            self.batch_size.observe(batch_requests, (model,))
            self.batch_items.observe(batch_items, (model,))
            if batch_tokens is not None and batch_positions is not None:
                self.batch_tokens.observe(batch_positions, (model,))
                self.tokens_real[model] = self.tokens_real.get(model, 0) + batch_tokens
                self.tokens_padded[model] = self.tokens_padded.get(model, 0) + batch_positions

    def record_expired(self, model: str, stage: str) -> None:
        """A request dropped at its deadline before it reached the runtime: in the HTTP process's queue for the
        worker ("gateway") or when the worker took it from the channel ("worker")."""
        with self._lock:
            self.expired[(model, stage)] = self.expired.get((model, stage), 0) + 1

    def record_late(self, model: str) -> None:
        """An answer the runtime computed after its request's deadline: the client already had its 504."""
        with self._lock:
            self.late[model] = self.late.get(model, 0) + 1

    def record_closed(self, reason: str) -> None:
        with self._lock:
            self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1

    def render(self) -> str:
        with self._lock:
            lines = []
            if self.info:
                lines += ["# HELP kiln_info Each served model and variant, and how the variant was chosen.",
                          "# TYPE kiln_info gauge"]
                for labels in self.info.values():
                    text = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
                    lines.append(f"kiln_info{{{text}}} 1")
            lines += ["# HELP kiln_requests_total Requests answered, by route, method, status and model.",
                      "# TYPE kiln_requests_total counter"]
            for (route, method, status, model), count in sorted(self.requests.items()):
                lines.append(f'kiln_requests_total{{route="{route}",method="{method}",status="{status}",'
                             f'model="{_label(model)}"}} {count}')
            lines += ["# HELP kiln_requests_in_flight Requests being handled now.",
                      "# TYPE kiln_requests_in_flight gauge", f"kiln_requests_in_flight {self.in_flight}"]
            lines += self.latency.render(("route", "model"))
            lines += self.queue.render(("model",))
            lines += self.inference.render(("model",))
            lines += self.batch_size.render(("model",))
            lines += self.batch_items.render(("model",))
            lines += self.batch_tokens.render(("model",))
            lines += _counter("kiln_batch_tokens_real_total", "Real (unpadded) tokens of the text batches run, by "
                              "model.", self.tokens_real)
            lines += _counter("kiln_batch_tokens_padded_total", "Positions the text batches computed (padding "
                              "included), by model.", self.tokens_padded)
            lines += ["# HELP kiln_batch_padding_waste Positions computed per real token over the text batches run "
                      "(1.0: no padding), by model.", "# TYPE kiln_batch_padding_waste gauge"]
            for model, real in sorted(self.tokens_real.items()):
                if real:
                    lines.append(f'kiln_batch_padding_waste{{model="{_label(model)}"}} '
                                 f'{self.tokens_padded[model] / real:.4f}')
            lines += ["# HELP kiln_requests_expired_total Requests dropped at their deadline before reaching the "
                      "runtime, by model and where (gateway: the HTTP process's queue; worker: taken off the channel).",
                      "# TYPE kiln_requests_expired_total counter"]
            for (model, stage), count in sorted(self.expired.items()):
                lines.append(f'kiln_requests_expired_total{{model="{_label(model)}",stage="{stage}"}} {count}')
            lines += ["# HELP kiln_answers_late_total Requests the runtime ran that finished after their deadline "
                      "(the client had already been answered 504), by model.",
                      "# TYPE kiln_answers_late_total counter"]
            for model, count in sorted(self.late.items()):
                lines.append(f'kiln_answers_late_total{{model="{_label(model)}"}} {count}')
            lines += ["# HELP kiln_connections_open Client connections open in the HTTP process.",
                      "# TYPE kiln_connections_open gauge", f"kiln_connections_open {self.connections_open}"]
            lines += ["# HELP kiln_connections_closed_total Connections the server closed or refused below the app, "
                      "by reason.", "# TYPE kiln_connections_closed_total counter"]
            for reason, count in sorted(self.connections_closed.items()):
                lines.append(f'kiln_connections_closed_total{{reason="{reason}"}} {count}')
        return "\n".join(lines) + "\n"


class ModelMetrics:
    """One model's view of the server's Metrics: what its WorkerGateway records, labelled with the model."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self.name = model

    def record_inference(self, queue_s: float, infer_s: float, batch_requests: int, batch_items: int,
                         batch_id: str, batch_tokens: int | None = None, batch_positions: int | None = None) -> None:
        self.metrics.record_inference(self.name, queue_s, infer_s, batch_requests, batch_items, batch_id,
                                      batch_tokens, batch_positions)

    def record_expired(self, stage: str) -> None:
        self.metrics.record_expired(self.name, stage)

    def record_late(self) -> None:
        self.metrics.record_late(self.name)


def _counter(name: str, help_text: str, values: dict[str, int]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    return lines + [f'{name}{{model="{_label(model)}"}} {count}' for model, count in sorted(values.items())]


def _label(value: str) -> str:
    """A Prometheus label value: backslashes, quotes and newlines escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
