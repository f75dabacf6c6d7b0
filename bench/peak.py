"""This machine's compute peak per precision, measured in the bench run itself with the bench's thread count.

A latency says how fast an artifact is; a fraction of the machine's peak says whether a faster one is still
possible. The peak is what a large, square matrix multiply reaches here: torch's fp32 and bf16 GEMM (AMX or
AVX-512 BF16 where the CPU has them, emulated otherwise) and ONNX Runtime's INT8 `MatMulInteger`. It is a
practical roofline, not the datasheet's: the best these libraries do on these cores.

`python -m kiln.bench.peak THREADS PRECISION[,PRECISION...]` prints `{"fp32": GFLOP/s, ...}` as one JSON line;
a fresh process each, so nothing else kiln loaded shares its memory or thread pools.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np

SIZE = 1024  # 2.1 GFLOP a multiply: long enough to time, short enough to repeat
SECONDS = 0.6


def _best_rate(run: Callable[[], object], flops: float, seconds: float = SECONDS) -> float:
    """GFLOP/s of the fastest call after a warm-up: the peak, not the average."""
    for _ in range(3):
        run()
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def torch_peak(dtype_name: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(SIZE, SIZE).to(dtype)
    b = torch.randn(SIZE, SIZE).to(dtype)
    with torch.inference_mode():
        return _best_rate(lambda: a @ b, 2.0 * SIZE**3)


def int8_peak(threads: int) -> float:
    """ONNX Runtime's MatMulInteger (uint8 x int8 -> int32), the kernel its INT8 artifacts run."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    weight = np.random.default_rng(0).integers(-127, 127, (SIZE, SIZE), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [SIZE, SIZE])],
        [onnx.numpy_helper.from_array(weight, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
    return _best_rate(lambda: session.run(None, {"a": a}), 2.0 * SIZE**3)


def measure(threads: int, precisions: list[str]) -> dict[str, float]:
    found = {}
    for precision in precisions:
        found[precision] = round(int8_peak(threads) if precision == "int8" else torch_peak(precision, threads), 2)
    return found


def main(argv: list[str]) -> int:
    threads, precisions = int(argv[0]), argv[1].split(",")
    print(json.dumps(measure(threads, precisions)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
