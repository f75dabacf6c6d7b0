"""The channel between the HTTP process and the inference workers: length-prefixed pickles on a Unix socket.

Why not LitServe's queues: they are Manager proxies, so every put and get is a round trip through a
separate manager process (profiled here, those hops cost more CPU than the HTTP layer); and why not
`multiprocessing.Queue`: a worker killed while it holds the queue's lock leaves it locked forever,
and the restarted worker would never see a request. A socket per worker has neither problem: the
kernel closes it when the worker dies, which tells the HTTP process at once which requests were lost.

The socket lives in a private (0700) temporary folder and only kiln's own processes connect to it,
so the pickles it carries never come from a client.

Both ends live here: `WorkerGateway` (the HTTP process's end: it sends `Job`s and waits for their
`Answer`s) and `WorkerChannel` (the worker's end, used by serve.batching's loop), with the messages they
exchange: a worker opens with `Hello`, then receives `Job`s and sends one `Answer` per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import pickle
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kiln.serve.protocol import RequestError

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30


# --- messages ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    """The first message on a worker's connection: which worker this is (LitServe's worker id) and its process."""

    worker: str
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    """HTTP process -> worker: one validated request to run."""

    uid: int  # unique within the HTTP process; the Answer names it
    enqueued: float  # time.monotonic() when the HTTP process queued it
    item: Any  # a serve.api.WorkItem
    # time.monotonic() (one clock for every process on the machine) past which nobody waits for the answer: the
    # worker drops the request unrun (an `expired` Answer) if it takes it off the channel later than this.
    deadline: float = math.inf


@dataclass(frozen=True, slots=True)
class Result:
    """One request's share of a batch the worker ran (made by serve.api.KilnAPI.predict)."""

    outputs: dict | None  # output name -> array, this request's items only; None when `error` is set
    queue_s: float
    infer_s: float
    batch_requests: int
    batch_items: int
    batch_id: str
    error: str | None = None  # the runtime failed on this request alone (the rest of its batch was answered)
    tokens: int | None = None  # text models: the tokens this request's texts encoded to (OpenAI `usage`)
    batch_tokens: int | None = None  # text models: real tokens of the whole batch
    batch_positions: int | None = None  # text models: positions the batch computed, padding included
    # time.time() when the runtime began the batch: a trace's spans (serve.tracing) are built from it and the timings
    # above after the answer, rather than carried through the batching loop.
    run_started: float = 0.0


def batch_results(batch, ran, batch_id: str, run_started: float = 0.0) -> list[Result]:
    """Each request's Result from a batch a core.runner.ModelRunner ran (`batch`: its Batch, `ran`: its BatchRun,
    `run_started`: time.time() when the run began, for traces): the one shape every host of a runner answers in
    (LitServe's worker, a Ray Serve replica)."""
    items = sum(batch.counts)
    tokens = ran.tokens
    real = sum(tokens) if tokens else None
    return [Result(outputs, max(0.0, batch.started - item.enqueued), ran.infer_s, len(batch.items), items, batch_id,
                   error, tokens[i] if tokens else None, batch_tokens=real, batch_positions=ran.padded_tokens,
                   run_started=run_started)
            for i, (item, (outputs, error)) in enumerate(zip(batch.items, ran.outcomes))]


@dataclass(frozen=True, slots=True)
class Answer:
    """Worker -> HTTP process: the outcome of one Job."""

    uid: int
    result: Result | None = None  # None: LitServe's loop failed the request before or while running it
    status_code: int = 200  # a failure's HTTP status (504: it reached its deadline unrun)
    expired: bool = False  # the worker dropped it at its deadline without running it


# --- framing -----------------------------------------------------------------------------------------------------

def encode(message) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(data)) + data


async def read_frame(reader):
    """One message from an asyncio StreamReader (HTTP process side)."""
    header = await reader.readexactly(HEADER.size)
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes is over the limit")
    return pickle.loads(await reader.readexactly(size))


# --- the worker's end --------------------------------------------------------------------------------------------

class WorkerChannel:
    """The worker's end: blocking, buffered, one reader and one writer (the worker's loop thread)."""

    def __init__(self, path: str, worker_id: str) -> None:
        self.path = path
        self.worker_id = worker_id
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []

    def connect(self) -> bool:
        if not os.path.exists(self.path):
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        self.sock = sock
        self.buffer.clear()
        self.outgoing.clear()
        self.send(Hello(self.worker_id, os.getpid()))
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None

    def _frame(self):
        if len(self.buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self.buffer)
        if len(self.buffer) < HEADER.size + size:
            return None
        data = bytes(self.buffer[HEADER.size:HEADER.size + size])
        del self.buffer[:HEADER.size + size]
        return pickle.loads(data)

    def recv(self, timeout: float):
        """The next message, or None after `timeout` seconds; ConnectionError when the HTTP side is gone."""
        message = self._frame()
        if message is not None:
            return message
        wait = timeout
        while True:
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return None
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the HTTP process closed the channel")
            self.buffer += chunk
            message = self._frame()
            if message is not None:
                return message
            wait = timeout  # a frame arrives in pieces only when it is large; keep reading it

    def send(self, message) -> None:
        self.sock.sendall(encode(message))

    def queue(self, message) -> None:
        self.outgoing.append(encode(message))

    def flush(self) -> None:
        if self.outgoing:
            data = b"".join(self.outgoing)
            self.outgoing.clear()
            self.sock.sendall(data)


# --- the HTTP process's end --------------------------------------------------------------------------------------

SEND_AHEAD = 512 * 1024  # bytes of requests written to a worker's socket ahead of it; the rest wait in its outbox


@dataclass
class _Worker:
    name: str
    writer: asyncio.StreamWriter
    pid: int = 0  # its process (Hello): serve.control stops the workers of a version it retires
    in_flight: dict[int, asyncio.Future] = field(default_factory=dict)  # uid -> the waiting request
    # Requests not yet written to the socket: their uids oldest first, and their frames. They leave only while the
    # socket takes them (at most SEND_AHEAD bytes buffered ahead of the worker); a request whose deadline passes
    # first is dropped here, frame freed at once, and never reaches the worker.
    outbox: deque[int] = field(default_factory=deque)
    frames: dict[int, bytes] = field(default_factory=dict)
    scheduled: bool = False  # a send is due at the end of this loop turn (requests parsed together, one write)
    draining: asyncio.Task | None = None  # waits for the worker to read, then sends the rest


class WorkerLost(Exception):
    """The worker running a request died; the request is answered 503 at once."""


class WorkerGateway:
    """Sends work to the inference workers over this channel and waits for the answer, with a deadline.

    Runs in the HTTP process, on its event loop: no threads and no locks. Each worker connects on
    start (and again after LitServe restarts it); a request goes to the worker with the fewest in
    flight. When a worker's connection closes, its requests fail with 503 immediately, and the
    server reports not-ready until the restarted worker connects.

    Each request has one deadline, `timeout_s` after it is submitted, that covers everything: waiting in the
    worker's outbox here, the write to the socket, the worker's queue and the run. At the deadline its client is
    answered 504, whatever stage it is in; the worker drops it unrun if it has not started it.
    """

    def __init__(self, channel_path: str, workers: int, timeout_s: float, metrics, name: str = "",
                 max_queued: int | None = None) -> None:
        self.name = name  # the model this gateway serves (log lines)
        self.channel_path = channel_path
        self.expected = workers
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.uids = itertools.count()  # unique within this HTTP process, which is all a worker answers to
        self.workers: dict[str, _Worker] = {}
        self._server = None
        self._stopping = False
        # Backpressure: the requests (and their items) submitted and not yet answered, at most `max_queued`
        # requests (--max-queued-requests; None: no cap, the deadline sheds), and the seconds per item the
        # workers' batches took (a moving average over their Results), from which retry_after_s estimates when
        # the queue will have drained.
        self.max_queued = max_queued
        self.queued = 0
        self.queued_items = 0
        self.per_item_s = 0.0

    def retry_after_s(self) -> float:
        """When a refused client should come back: the queued items times the measured seconds per item, shared
        among the connected workers (at least 1 s; at most the request timeout, past which the queue sheds)."""
        estimate = self.queued_items * self.per_item_s / max(1, len(self.workers))
        return min(max(1.0, estimate), max(1.0, self.timeout_s))

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.channel_path)
        self._server = await asyncio.start_unix_server(self._serve_worker, path=self.channel_path)
        os.chmod(self.channel_path, 0o600)

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for worker in list(self.workers.values()):
            worker.writer.close()

    @property
    def connected(self) -> int:
        """Workers connected now (a crashed one is gone until LitServe's restart connects again)."""
        return len(self.workers)

    def ready(self) -> bool:
        return len(self.workers) >= self.expected

    def in_flight(self) -> int:
        """Requests accepted and not yet answered (serve.control drains a version to 0 before stopping it)."""
        return sum(len(worker.in_flight) for worker in self.workers.values())

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self.workers.values() if worker.pid]

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            writer.close()
            return
        if not isinstance(hello, Hello):
            writer.close()
            return
        worker = _Worker(str(hello.worker), writer, int(hello.pid))
        previous = self.workers.get(worker.name)
        if previous is not None:
            self._lost(previous)
        self.workers[worker.name] = worker
        print(f"kiln: {self.name or 'model'} worker {worker.name} ready (pid {hello.pid}; "
              f"{len(self.workers)} of {self.expected})", flush=True)
        try:
            while True:
                answer: Answer = await read_frame(reader)
                self._answered(worker, answer)
        except (asyncio.IncompleteReadError, ConnectionError, EOFError):
            pass
        finally:
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
                if not self._stopping:
                        print(f"kiln: {self.name or 'model'} worker {worker.name} lost (pid {hello.pid}); its requests "
                          "were answered 503, LitServe restarts it", flush=True)
            self._lost(worker)
            writer.close()

    def _answered(self, worker: _Worker, answer: Answer) -> None:
        result = answer.result
        if result is not None:  # every answer of a batch that ran, whether or not its client waited
            self.metrics.record_inference(result.queue_s, result.infer_s, result.batch_requests,
                                          result.batch_items, result.batch_id, result.batch_tokens,
                                          result.batch_positions)
            per_item = result.infer_s / max(1, result.batch_items)
            self.per_item_s = per_item if not self.per_item_s else 0.9 * self.per_item_s + 0.1 * per_item
        if answer.expired:
            self.metrics.record_expired("worker")
        future = worker.in_flight.pop(answer.uid, None)
        if future is not None and not future.done():
            future.set_result(answer)
        elif result is not None:  # its client was answered 504 at the deadline while it ran
            self.metrics.record_late()

    def _lost(self, worker: _Worker) -> None:
        for future in worker.in_flight.values():
            if not future.done():
                future.set_exception(WorkerLost())
        worker.in_flight.clear()
        worker.outbox.clear()
        worker.frames.clear()

    def _write(self, worker: _Worker) -> None:
        """Writes queued requests to the worker's socket while it has room; those nobody waits for are skipped."""
        writer = worker.writer
        if writer.is_closing():
            return
        room = SEND_AHEAD - writer.transport.get_write_buffer_size()
        frames = []
        while worker.outbox and room > 0:
            frame = worker.frames.pop(worker.outbox.popleft(), None)
            if frame is not None:  # None: its client was answered at the deadline and the frame dropped
                frames.append(frame)
                room -= len(frame)
        if frames:
            writer.write(b"".join(frames))

    def _send(self, worker: _Worker) -> None:
        worker.scheduled = False
        self._write(worker)
        if worker.outbox and worker.draining is None and not worker.writer.is_closing():
            worker.draining = asyncio.get_running_loop().create_task(self._drain(worker))

    async def _drain(self, worker: _Worker) -> None:
        """Sends the rest of the outbox as the worker reads, without ever holding up a client: each client waits
        on its own deadline, not on this."""
        try:
            while worker.outbox and not worker.writer.is_closing():
                await worker.writer.drain()  # returns once the worker has read most of what was written
                if worker.writer.transport.get_write_buffer_size() >= SEND_AHEAD:
                    await asyncio.sleep(0.005)  # drain() came back with the buffer still full: do not spin
                self._write(worker)
        except (ConnectionError, OSError):
            pass  # the worker is gone: _serve_worker fails its requests
        finally:
            worker.draining = None

    async def submit(self, item) -> Result:
        """Runs `item` (a serve.api.WorkItem) on the least busy worker: its Result, or a RequestError.

        The request's deadline starts now: by `timeout_s` from here its client has an answer, 504 at the latest."""
        submitted = time.monotonic()
        deadline = submitted + self.timeout_s
        if not self.workers:
            raise RequestError("the inference worker is not ready (starting or restarting); retry shortly", 503,
                               retry_after=self.retry_after_s())
        if self.max_queued is not None and self.queued >= self.max_queued:
            wait = self.retry_after_s()
            raise RequestError(f"model {self.name!r} has {self.queued} requests waiting, its limit "
                               f"(--max-queued-requests {self.max_queued}); retry in {math.ceil(wait)} s", 429,
                               retry_after=wait)
        worker = min(self.workers.values(), key=lambda w: len(w.in_flight))
        uid = next(self.uids)
        future = asyncio.get_running_loop().create_future()
        worker.in_flight[uid] = future
        self.queued += 1
        self.queued_items += item.count
        try:
            worker.frames[uid] = encode(Job(uid, submitted, item, deadline))
            worker.outbox.append(uid)
            if not worker.scheduled and worker.draining is None:  # requests parsed in one loop turn: one write
                worker.scheduled = True
                asyncio.get_running_loop().call_soon(self._send, worker)
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                answer: Answer = await future
        except TimeoutError:
            if worker.frames.pop(uid, None) is not None:  # still in the outbox: it never reaches the worker
                self.metrics.record_expired("gateway")
            raise RequestError(f"no answer within {self.timeout_s:g}s; the server is overloaded or the request too "
                               "large, retry later or with fewer items", 504,
                               retry_after=self.retry_after_s()) from None
        except (WorkerLost, ConnectionError):
            raise RequestError("the inference worker stopped while running this request; it is being restarted, "
                               "retry shortly", 503, retry_after=self.retry_after_s()) from None
        finally:
            worker.in_flight.pop(uid, None)
            worker.frames.pop(uid, None)
            self.queued -= 1
            self.queued_items -= item.count
        result = answer.result
        if result is None:
            if answer.status_code == 504:  # shed unrun by the worker: the queue will not drain before its deadline
                raise RequestError(f"no answer within {self.timeout_s:g}s: the request reached its deadline before "
                                   "the worker could run it; the server is overloaded, retry later", 504,
                                   retry_after=self.retry_after_s())
            raise RequestError("the inference worker failed on this request", 500)
        if result.error is not None:
            raise RequestError(result.error, 500)
        return result
