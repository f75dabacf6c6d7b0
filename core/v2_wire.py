"""The byte layout of the V2 binary tensor extension (Triton's `extension_binary_data`), shared by the server,
which reads requests and writes answers in it (kiln.serve.v2_binary), and the load generator, which writes requests
in it (kiln.bench.loadtest): one place says how each datatype travels.

Elements are little-endian and row-major; BYTES elements each carry a 4-byte little-endian length; BF16 travels as
the upper 16 bits of an IEEE float32 (numpy has no bfloat16). The JSON header's length is in the HTTP header
`Inference-Header-Content-Length`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from kiln.core.signature import DTYPE_TABLE

HEADER_LENGTH = "inference-header-content-length"
LENGTH = struct.Struct("<I")

# V2 datatype -> little-endian numpy dtype of its elements on the wire; BYTES has no fixed size.
WIRE_DTYPES: dict[str, np.dtype] = {d.v2: np.dtype(d.numpy).newbyteorder("<") for d in DTYPE_TABLE.values()
                                    if d.numpy is not None}
WIRE_DTYPES["BF16"] = np.dtype("<u2")


def tensor_bytes(datatype: str, data: Any) -> bytes:
    """A tensor's data on the wire: raw little-endian elements, or length-prefixed BYTES (str elements as UTF-8)."""
    if datatype == "BYTES":
        parts = []
        for element in np.asarray(data, dtype=object).reshape(-1):
            raw = element if isinstance(element, bytes) else str(element).encode()
            parts.append(LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if datatype == "BF16":  # float32 values: round each to the nearest bfloat16 (ties to even)
        bits = np.ascontiguousarray(data, dtype="<f4").view("<u4").astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(data, dtype=WIRE_DTYPES[datatype]).tobytes()
