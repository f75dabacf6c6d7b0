"""The channel between the HTTP process and the inference workers: length-prefixed pickles on a Unix socket.

Why not LitServe's queues: they are Manager proxies, so every put and get is a round trip through a
separate manager process (profiled here, those hops cost more CPU than the HTTP layer); and why not
`multiprocessing.Queue`: a worker killed while it holds the queue's lock leaves it locked forever,
and the restarted worker would never see a request. A socket per worker has neither problem: the
kernel closes it when the worker dies, which tells the HTTP process at once which requests were lost.

The socket lives in a private (0700) temporary folder and only kiln's own processes connect to it,
so the pickles it carries never come from a client.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30


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
        self.send({"worker": self.worker_id})
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
