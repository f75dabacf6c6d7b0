"""OpenVINO on the CPU: IR artifacts (`.xml` graph + `.bin` weights), fp32, bf16 and NNCF INT8.

The precision a variant runs in is part of the artifact, not of the machine: the emitter records the variant's
precision in the IR's rt_info (`kiln/precision`) and this runtime always passes the matching
`INFERENCE_PRECISION_HINT`, so an fp32 variant stays fp32 on a CPU where OpenVINO would pick bf16 by itself (AMX), and
a bf16 variant asks for bf16 only where the CPU has it natively (kiln.core.machine.bf16_native, the one check):
elsewhere OpenVINO would run it in fp32 and the variant's name would lie, so it refuses to open instead, as
`--variant auto` never picks it there.

Threads and streams come from `RuntimeOptions`: one stream, `INFERENCE_NUM_THREADS` threads, the latency hint, as
ONNX Runtime gets its intra-op threads; batch and sequence stay dynamic (the IR's -1 dimensions). An infer request
is not safe to share between threads, so each calling thread gets its own from the one compiled model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import ManifestError, RuntimeUnavailable, one_line
from kiln.core.runtime import Arrays, RuntimeOptions, RuntimeSpec, cast_inputs
from kiln.core.signature import Signature

PRECISION_KEY = ["kiln", "precision"]  # where the emitter records the variant's precision in the IR


def precision_hint(model: Any, variant: str) -> str:
    """The CPU plugin's inference precision for the variant's precision, recorded in the IR by the emitter.

    fp32 is pinned to f32 (OpenVINO would pick bf16 by itself on AMX). bf16 needs the CPU's own bf16 instructions:
    elsewhere OpenVINO would run it in fp32 under a bf16 name, so it is refused. An INT8 model's layers that stay
    unquantized run in bf16 where the CPU has it (as the export verified them on such a CPU) and in f32 elsewhere,
    which only adds precision.
    """
    from kiln.core.machine import bf16_native

    precision = str(model.get_rt_info(PRECISION_KEY).astype(str)) if model.has_rt_info(PRECISION_KEY) else "fp32"
    if precision == "bf16" and not bf16_native():
        raise RuntimeUnavailable(f"variant {variant!r} runs in bf16, which this CPU has no instructions for (no "
                                 "AVX-512 BF16 or AMX): OpenVINO would run it in fp32 under a bf16 name; serve "
                                 "another variant (--variant, or --variant auto)")
    if precision == "fp32":
        return "f32"
    return "bf16" if bf16_native() else "f32"


def telemetry_off() -> None:
    """Keep OpenVINO's telemetry from sending anything from this process.

    `openvino` installs `openvino-telemetry`, which OpenVINO's model converter and NNCF call with the opt-in dialog
    off: with no consent file in the user's home they count as consenting and send usage events to Google Analytics.
    kiln never lets them: every check answers 'declined' (so no client-id file is written either), a Telemetry
    already made is switched off, and its sender sends nothing. Called before the converter or NNCF is imported.
    """
    try:
        from openvino_telemetry import main
        from openvino_telemetry.utils import opt_in_checker, sender
    except ImportError:  # not installed: nothing can send
        return

    def declined(self: Any, *args: Any, **kwargs: Any) -> Any:
        return opt_in_checker.ConsentCheckResult.DECLINED

    def send_nothing(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    opt_in_checker.OptInChecker.check = declined
    sender.TelemetrySender.send = send_nothing
    made = getattr(main.Telemetry, "_SingletonMetaClass__single_instance", None)
    if made is not None:
        made.consent = False


def compile_config(threads: int, precision: str) -> dict[str, Any]:
    """The CPU plugin's settings: what a single-request server wants (latency hint, one stream) on `threads` cores,
    in the artifact's own precision; no model cache directory is written anywhere."""
    return {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": precision}


class OpenVinoRuntime:
    def __init__(self, path: Path, signature: Signature, variant: str, options: RuntimeOptions) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeUnavailable("variant needs openvino, which is not installed; pip install openvino") from exc
        self.threads = options.resolved_threads
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise ManifestError(f"OpenVINO cannot read {path.name} ({one_line(exc, 200)}); re-export the folder") from exc
        precision = self.precision = precision_hint(model, variant)
        try:
            self.compiled = core.compile_model(model, "CPU", compile_config(self.threads, precision))
        except Exception as exc:
            raise ManifestError(f"OpenVINO cannot compile {path.name} ({one_line(exc, 200)}); re-export the "
                                "folder with this openvino") from exc
        names = {name for port in self.compiled.inputs for name in port.get_names()}
        missing = [n for n in signature.input_names if n not in names]
        if missing:
            raise ManifestError(f"{path.name} has no input(s) {', '.join(missing)} that the manifest's signature "
                                "names; re-export the folder")
        self.outputs = [self.compiled.output(name) for name in signature.output_names]
        self.signature = signature
        self.variant = variant
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, inputs: Arrays) -> Arrays:
        feed = dict(zip(self.signature.input_names, cast_inputs(self.signature, inputs)))
        result = self._request().infer(feed)
        # The request's output tensors are reused by its next run: copy them out.
        return {name: np.array(result[port], copy=True) for name, port in zip(self.signature.output_names, self.outputs)}

    def close(self) -> None:
        """The compiled model and its requests go with the last reference to them."""
        self._local = threading.local()
        self.compiled = None
        self.outputs = []


SPEC = RuntimeSpec(name="openvino", suffix=".xml", requires="openvino", v2_platform="openvino",
                   open=OpenVinoRuntime)
