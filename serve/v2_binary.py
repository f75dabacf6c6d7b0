"""The V2 binary tensor extension (Triton's `extension_binary_data`), which `tritonclient` uses by default.

A binary request is a JSON header followed by raw tensor bytes: the header's length is in the HTTP header
`Inference-Header-Content-Length`; each binary input says how many bytes it takes in `parameters.binary_data_size`,
and those bytes follow the JSON in the order the inputs are listed: little-endian, row-major, and for BYTES each
element as a 4-byte little-endian length and then its bytes. A response is binary the same way where an output
asks for it (`parameters.binary_data: true`) or the request does for all (`parameters.binary_data_output: true`).

Why it matters for speed as well as for stock clients: 32 digits images are 128 KB of floats that numpy reads in
place; as JSON they are about 400 KB of text that must be parsed number by number in the HTTP process, whose CPU
on a small machine is taken from the model.

Every size is checked against the body before a byte is read: a length that is negative, not an integer, past
the end of the body, disagrees with shape x the datatype's size, or leaves bytes unclaimed is a 400 with the
reason, never a 5xx or a read past the buffer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from kiln.core.v2_wire import HEADER_LENGTH, LENGTH, WIRE_DTYPES, tensor_bytes
from kiln.serve.protocol import RequestError

__all__ = ["HEADER_LENGTH", "BinarySection", "encode_response", "read_array", "read_strings", "split_body",
           "tensor_bytes"]

MAX_LENGTH_DIGITS = 18  # a header length of more digits is past any body kiln accepts (and past int64)


def split_body(raw: bytes, header_length: str, expected: Any) -> tuple[bytes, memoryview]:
    """The JSON header and the binary section after it (`header_length`: the HTTP header's value)."""
    text = header_length.strip()
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses), and "-1", "1e3", " ", "+5" are not
    # lengths. The digit count is bounded before int() is called: past 4,300 digits int() raises (Python's
    # integer-string limit), and any length past MAX_LENGTH_DIGITS digits exceeds every body anyway.
    if not (text.isascii() and text.isdigit()):
        raise RequestError(f"Inference-Header-Content-Length {header_length[:40]!r} is not a non-negative integer",
                           400, expected)
    if len(text.lstrip("0")) > MAX_LENGTH_DIGITS:
        raise RequestError(f"Inference-Header-Content-Length ({len(text)} digits) is longer than the body of "
                           f"{len(raw)} bytes", 400, expected)
    length = int(text.lstrip("0") or "0")
    if length > len(raw):
        raise RequestError(f"Inference-Header-Content-Length is {length} but the body has only {len(raw)} bytes",
                           400, expected)
    if length == 0:
        raise RequestError("Inference-Header-Content-Length is 0: the JSON header of the request is missing", 400,
                           expected)
    view = memoryview(raw)
    return bytes(view[:length]), view[length:]


class BinarySection:
    """The bytes after the JSON header, handed out to the binary inputs in the order they are listed."""

    def __init__(self, data: memoryview, expected: Any) -> None:
        self.data = data
        self.offset = 0
        self.expected = expected

    def take(self, size: Any, where: str) -> memoryview:
        if isinstance(size, bool) or not isinstance(size, int):
            raise RequestError(f"{where}: parameters.binary_data_size must be an integer number of bytes", 400,
                               self.expected)
        if size < 0:
            raise RequestError(f"{where}: binary_data_size {size} is negative", 400, self.expected)
        left = len(self.data) - self.offset
        if size > left:
            what = ("the request has no binary section (send its JSON length in Inference-Header-Content-Length)"
                    if not len(self.data) else f"only {left} bytes of binary data are left in the body")
            raise RequestError(f"{where}: binary_data_size is {size} but {what}", 400, self.expected)
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def array(self, chunk: memoryview, datatype: str, shape: list[int], where: str) -> np.ndarray:
        return read_array(chunk, datatype, shape, where, self.expected)

    def strings(self, chunk: memoryview, count: int, where: str) -> list[str]:
        return read_strings(chunk, count, where, self.expected)

    def finish(self) -> None:
        left = len(self.data) - self.offset
        if left:
            raise RequestError(f"the body has {left} bytes after the binary data the inputs declare "
                               "(binary_data_size); the sizes must add up to the body", 400, self.expected)


def read_array(chunk: memoryview, datatype: str, shape: list[int], where: str, expected: Any) -> np.ndarray:
    """A fixed-size tensor from its raw bytes (no copy): the size must be exactly shape x the element size."""
    dtype = WIRE_DTYPES.get(datatype)
    if dtype is None:
        raise RequestError(f"{where}: datatype {datatype!r} cannot be sent as binary data here", 400, expected)
    need = math.prod(shape) * dtype.itemsize
    if len(chunk) != need:
        raise RequestError(f"{where}: binary_data_size is {len(chunk)} bytes but shape {shape} of {datatype} needs "
                           f"{need}", 400, expected)
    array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise RequestError(f"{where}: BOOL elements must be bytes 0 or 1", 400, expected)
    if datatype == "BF16":  # the upper half of a float32: widen it, as the JSON path reads BF16 numbers as float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_strings(chunk: memoryview, count: int, where: str, expected: Any) -> list[str]:
    """BYTES elements: each a 4-byte little-endian length and then that many bytes of UTF-8."""
    texts = []
    offset = 0
    end = len(chunk)
    for i in range(count):
        if end - offset < LENGTH.size:
            raise RequestError(f"{where}: the binary data ends before element {i} of {count} (each BYTES element "
                               "starts with a 4-byte little-endian length)", 400, expected)
        (size,) = LENGTH.unpack_from(chunk, offset)
        offset += LENGTH.size
        if size > end - offset:
            raise RequestError(f"{where}: element {i} says it has {size} bytes but only {end - offset} are left",
                               400, expected)
        try:
            texts.append(str(chunk[offset:offset + size], "utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"{where}: element {i} is not valid UTF-8", 400, expected) from None
        offset += size
    if offset != end:
        raise RequestError(f"{where}: {end - offset} bytes are left after the {count} elements that shape "
                           "declares", 400, expected)
    return texts


def encode_response(body: dict, binary: frozenset[str]) -> tuple[bytes, int | None]:
    """A V2 answer, with the outputs named in `binary` as raw bytes after the JSON: the payload and the JSON's
    length (None: all JSON)."""
    if not binary:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), None
    chunks = []
    outputs = []
    for tensor in body["outputs"]:
        if tensor["name"] in binary:
            raw = tensor_bytes(tensor["datatype"], tensor["data"])
            tensor = {k: v for k, v in tensor.items() if k != "data"}
            tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(raw)}
            chunks.append(raw)
        outputs.append(tensor)
    header = orjson.dumps({**body, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"".join((header, *chunks)), len(header)
