"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), beside HTTP: `kiln serve --grpc-port`.

It runs in the HTTP process, on the same event loop as uvicorn and the worker gateways (grpc.aio), so a gRPC
request reaches the same models, batching and workers as an HTTP one. A ModelInfer request is turned into the V2
body it stands for, with `raw_input_contents` as the binary tensor section (the same bytes in the same layout:
little-endian elements, 4-byte length before each BYTES element), and parsed by serve.protocol.parse_v2: one copy
of the validation for both transports. It then runs through serve.inference.InferenceService.call (auth, item
limits, metrics under the route label `grpc:ModelInfer`); outputs go back as `raw_output_contents`, as Triton
answers, which tritonclient.grpc reads at its defaults.

The messages are Triton's, generated from its grpc_service.proto (package `inference`, a superset of the Open
Inference Protocol's: the same messages and field numbers, plus Triton's extensions) and shipped ready-made in the
PyPI package tritonclient (BSD-3-Clause; `tritonclient.grpc.service_pb2`): kiln vendors no .proto and runs no
protoc. kiln registers the service itself, under the specification's name, from that module's service descriptor:
one handler per RPC, each a method of InferenceServicer with the RPC's name, so a new RPC is one method there; an
RPC with no method (Triton's statistics, shared memory, trace, log, config, streaming) answers UNIMPLEMENTED and
says what kiln serves instead. Requests arrive as bytes and are parsed in the handler, so a message that is not
valid protobuf is answered INVALID_ARGUMENT with the reason (grpc's own deserializer failure would be INTERNAL, no
reason). This module is imported only when `--grpc-port` starts the server (serve.server.start_grpc): importing
`tritonclient.grpc` runs its package __init__ (tritonclient's client, numpy), which an HTTP-only server skips.

Limits: a message over --max-body-bytes is refused by grpc itself (RESOURCE_EXHAUSTED); at most --max-connections
RPCs run at once (beyond that grpc answers RESOURCE_EXHAUSTED). Errors are gRPC status codes with kiln's message
(STATUS_CODES); a 429 or 503 carries the retry hint as `retry-after` trailing metadata (seconds), as HTTP's
Retry-After header does. The API key travels as `authorization: Bearer KEY` (or `x-api-key`) metadata; the
liveness and readiness RPCs answer without it, as their HTTP routes do.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from kiln.serve.inference import InferenceService
from kiln.serve.protocol import InferenceRequest, RequestError, ServedModel, parse_v2, v2_response
from kiln.serve.v2_binary import BinarySection, tensor_bytes

SERVICE = "inference.GRPCInferenceService"  # the specification's (and Triton's) service name
IMPLEMENTED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
               "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")  # the rest answer UNIMPLEMENTED

# RequestError.status (HTTP) -> the gRPC status code (the mapping serve.inference's docstring lists).
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,  # a model load asked while the server stops (serve.control)
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# V2 datatype -> the InferTensorContents field its values take when sent typed (FP16 and BF16 have none: raw only).
TYPED_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

MISSING_KEY = "missing or wrong API key; send it as 'authorization: Bearer KEY' metadata"
OPEN_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # answer without the key, as their HTTP routes


def typed_data(tensor: Any) -> list:
    """An input's values from its typed `contents`, as the `data` list of a V2 JSON tensor."""
    datatype = tensor.datatype
    where = f"input {tensor.name!r}"
    field = TYPED_CONTENTS.get(datatype)
    given = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if field is None:
        if datatype in ("FP16", "BF16"):
            raise RequestError(f"{where}: {datatype} has no typed contents in the protocol; send it in "
                               "raw_input_contents", 400)
        return []  # parse_v2 names the datatype as wrong
    if any(name != field for name in given):
        raise RequestError(f"{where} has datatype {datatype}: its values go in contents.{field}, not "
                           f"{', '.join('contents.' + name for name in given if name != field)}", 400)
    values = getattr(tensor.contents, field)
    if datatype != "BYTES":
        return list(values)
    texts = []
    for i, value in enumerate(values):
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(f"{where}: element {i} is not valid UTF-8", 400) from None
    return texts


def v2_body(request: Any) -> tuple[dict, BinarySection | None]:
    """A ModelInferRequest as the V2 request it stands for: the JSON body, and `raw_input_contents` (one entry per
    input, in order) as the binary section, each input declaring its entry's size as `binary_data_size`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send "
                           "one raw entry per input, in order, or typed contents only", 400)
    inputs = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(f"input {tensor.name!r} has both typed contents and raw_input_contents; send "
                                   "one", 400)
            entry["parameters"] = {"binary_data_size": len(raw[i])}
        else:
            entry["data"] = typed_data(tensor)
        inputs.append(entry)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [{"name": output.name} for output in request.outputs]
    section = BinarySection(memoryview(raw[0] if len(raw) == 1 else b"".join(raw)), None) if raw else None
    return body, section


def parse_infer(request: Any, model: ServedModel) -> InferenceRequest:
    body, section = v2_body(request)
    return parse_v2(body, model, section)


def infer_response(model: ServedModel, outputs: dict, parsed: InferenceRequest) -> Any:
    """The answer as Triton gives it: every output's bytes in `raw_output_contents`, in the order listed."""
    body = v2_response(model, outputs, parsed)
    response = pb.ModelInferResponse(model_name=body["model_name"], model_version=body["model_version"],
                                     id=body.get("id", ""))
    for tensor in body["outputs"]:
        response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        response.raw_output_contents.append(tensor_bytes(tensor["datatype"], tensor["data"]))
    return response


def presented_key(service: InferenceService, context: Any) -> bytes | None:
    if service.guard is None:
        return None
    headers = {}
    for key, value in context.invocation_metadata() or ():
        if key in ("authorization", "x-api-key"):
            headers[key.encode()] = value.encode("latin-1") if isinstance(value, str) else value
    return service.guard.presented_in(headers)


def string_parameter(parameters: Any, key: str) -> str | None:
    """A repository request's string parameter (Triton's ModelRepositoryParameter), or None where absent; 400 if it
    is of another kind."""
    if key not in parameters:
        return None
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "string_param":
        raise RequestError(f"parameters[{key!r}] must be a string_param", 400)
    return value.string_param


def tensor_metadata(tensors: list[dict]) -> list:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in tensors]


class InferenceServicer:
    """One method per RPC, named as the RPC, each taking the parsed request and the grpc.aio context and returning
    the response message or raising RequestError (answered as the gRPC status STATUS_CODES gives)."""

    def __init__(self, service: InferenceService, server_version: str) -> None:
        self.service = service
        self.server_version = server_version

    # --- health and metadata ---------------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=all(e.gateway.ready() for e in self.service.endpoints.values()))

    async def ModelReady(self, request: Any, context: Any) -> Any:
        guard = self.service.guard
        reveal = guard is None or guard.authorized(presented_key(self.service, context))
        endpoint = self.service.lookup(request.name, request.version or None, reveal=reveal)
        return pb.ModelReadyResponse(ready=endpoint.gateway.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="kiln", version=self.server_version,
                                         extensions=["binary_tensor_data", "model_repository"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = self.service.lookup(request.name, request.version or None).model
        versions = sorted(self.service.versions.get(model.name, {model.version: None}), key=int)
        return pb.ModelMetadataResponse(name=model.name, versions=versions, platform=model.platform,
                                        inputs=tensor_metadata(model.v2_inputs),
                                        outputs=tensor_metadata(model.v2_outputs))

    # --- inference -------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        parsed: list[InferenceRequest] = []
        served: list[ServedModel] = []

        def prepare(model: ServedModel) -> InferenceRequest:
            served.append(model)
            parsed.append(parse_infer(request, model))
            return parsed[0]

        carrier = None
        if self.service.tracing is not None:  # W3C trace context travels as metadata (lower-case keys)
            carrier = {key: value for key, value in context.invocation_metadata() or ()
                       if key in ("traceparent", "tracestate") and isinstance(value, str)}
        result = await self.service.call(request.model_name, prepare, front="grpc:ModelInfer",
                                         api_key=presented_key(self.service, context),
                                         version=request.model_version or None, carrier=carrier)
        return infer_response(served[0], result.outputs, parsed[0])  # the version that ran it (a swap may follow)

    # --- the model repository (Triton's extension) -----------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        """Every version of every model with its state and reason (serve.control's index, as HTTP's)."""
        from kiln.serve.routes import repository_index_entries

        control = self.service.control
        entries = (control.index(request.ready) if control is not None
                   else repository_index_entries(self.service.endpoints, request.ready))
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e["name"], version=e["version"], state=e["state"],
                                                  reason=e.get("reason", "")) for e in entries])

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        """serve.control's load, as HTTP's POST /v2/repository/models/{name}/load: the string parameter `folder`
        names an artifact folder inside the repository."""
        await self._control().load(request.model_name, string_parameter(request.parameters, "folder"))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        """serve.control's unload: every version of the model, or the string parameter `version`."""
        await self._control().unload(request.model_name, string_parameter(request.parameters, "version"))
        return pb.RepositoryModelUnloadResponse()

    def _control(self):
        if self.service.control is None:
            raise RequestError("this server has no model control", 501)
        return self.service.control

    # --- registration ----------------------------------------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        """{RPC name: grpc handler} for every RPC of the service descriptor: the methods named in IMPLEMENTED, and
        an UNIMPLEMENTED answer that says so for the rest (grpc's own would say only "Method not found!")."""
        handlers = {}
        for method in pb.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]].methods:
            response_class = getattr(pb, method.output_type.name)
            if method.client_streaming or method.server_streaming:  # ModelStreamInfer: kiln has no streaming RPC
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._refuse_stream(method.name), request_deserializer=None,
                    response_serializer=response_class.SerializeToString)
                continue
            request_class = getattr(pb, method.input_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._handle(method.name, request_class), request_deserializer=None,
                response_serializer=response_class.SerializeToString)
        return handlers

    def _refuse_stream(self, name: str):
        async def refuse(requests: Any, context: Any) -> Any:
            await abort(context, unimplemented(name))
            yield  # an async generator, as a stream handler is (never reached: abort raises)

        return refuse

    def _handle(self, name: str, request_class: Any):
        implementation = getattr(self, name) if name in IMPLEMENTED else None
        service = self.service
        label = f"grpc:{name}"
        # ModelInfer's key check and count are InferenceService.call's (a request refused before it is counted here).
        inference = name == "ModelInfer"
        needs_key = name not in OPEN_RPCS and not inference

        async def handle(raw: bytes, context: Any) -> Any:
            started = time.perf_counter()
            status = 500
            counted = not inference
            try:
                try:
                    request = request_class.FromString(raw)
                except DecodeError as exc:
                    counted = True
                    raise RequestError(f"the request is not a valid inference.{request_class.DESCRIPTOR.name} "
                                       f"message ({exc})", 400) from None
                if needs_key and service.guard is not None \
                        and not service.guard.authorized(presented_key(service, context)):
                    raise RequestError(MISSING_KEY, 401)
                if implementation is None:
                    raise unimplemented(name)
                response = await implementation(request, context)
                status = 200
                return response
            except RequestError as error:
                status = error.status
                await abort(context, error)
            finally:
                if counted and service.metrics is not None:
                    service.metrics.record_request(label, "CALL", status, time.perf_counter() - started)

        return handle


def unimplemented(name: str) -> RequestError:
    return RequestError(f"{SERVICE}/{name} is not implemented by kiln (it serves the Open Inference Protocol's RPCs "
                        f"and Triton's model repository index: {', '.join(IMPLEMENTED)})", 501)


async def abort(context: Any, error: RequestError) -> None:
    """Ends the RPC with the gRPC status for `error`, kiln's message as its details, and the retry hint (429, 503)
    as `retry-after` trailing metadata."""
    code = STATUS_CODES.get(error.status, grpc.StatusCode.UNKNOWN)
    hint = error.retry_after_header
    trailing: tuple = () if hint is None else (("retry-after", hint),)
    message = MISSING_KEY if error.status == 401 else str(error)  # the key travels as metadata here, not headers
    await context.abort(code, message, trailing_metadata=trailing)


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)]  # a second server on the same port fails to start instead of sharing it


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(service: InferenceService, host: str, port: int, max_message_bytes: int, max_rpcs: int,
                server_version: str) -> Any:
    """Starts the gRPC server on the running event loop; the grpc.aio.Server (stop it with `await .stop(grace)`).
    Raises OSError when the port cannot be bound."""
    server = grpc.aio.server(options=server_options(max_message_bytes), maximum_concurrent_rpcs=max_rpcs)
    servicer = InferenceServicer(service, server_version)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, servicer.handlers()),))
    address = grpc_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"the gRPC port {address} cannot be bound ({exc}); is another server on it? choose another "
                      "--grpc-port") from None
    if bound == 0:
        raise OSError(f"the gRPC port {address} cannot be bound; is another server on it? choose another --grpc-port")
    await server.start()
    return server
