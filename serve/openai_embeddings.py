"""`POST /v1/embeddings`, the OpenAI embeddings API, for embedding models: the stock `openai` client, pointed at
kiln with `base_url`, works unchanged.

Requests take `input` (a string or a list of strings), `model` (the served model's name), `encoding_format`
(`float`, the default, or `base64`: little-endian float32 bytes) and `dimensions` (only the model's own width).
They go through the same validation limits, batching and auth as every other route. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the client raises its usual exceptions.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from kiln.serve.protocol import InferenceRequest, RequestError, ServedModel, check_texts

ENCODINGS = ("float", "base64")


def expected(model: ServedModel) -> dict[str, Any]:
    return {"model": model.name, "input": "a string or a list of strings", "encoding_format": "float | base64",
            "max_items": model.request_limit}


def _error(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(message, status, param=param, code=code)


def model_named(body: Any) -> str | None:
    """The served model a request names in `model` (the server picks the model by it), or None."""
    name = body.get("model") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None


def parse(body: Any, model: ServedModel) -> InferenceRequest:
    if model.task != "embedding" or not model.text:
        raise _error(f"model {model.name!r} is not a text embedding model; /v1/embeddings serves those only",
                     404, "model", "model_not_found")
    if not isinstance(body, dict):  # serve.routes.Inference found the model by the body's `model` already
        raise _error("the body must be a JSON object with 'model' and 'input'")
    if "input" not in body:
        raise _error("'input' is required: a string or a list of strings", param="input")
    raw = body["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
        raise _error("token arrays are not supported; send text (the server tokenizes)", param="input")
    try:
        texts = check_texts(texts, "'input'", model, None)
    except RequestError as exc:  # OpenAI answers invalid input with 400 where kiln's own routes say 422
        raise _error(str(exc), 400 if exc.status == 422 else exc.status, "input") from None
    encoding = body.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise _error(f"'encoding_format' must be one of {', '.join(ENCODINGS)}", param="encoding_format")
    width = model.signature.outputs[0].shape[-1]
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != width:
        raise _error(f"'dimensions' {dimensions!r} is not available: this model's embeddings have {width}",
                     param="dimensions")
    return InferenceRequest(None, texts, len(texts), False, encoding=encoding)


def respond(model: ServedModel, outputs: dict[str, np.ndarray], request: InferenceRequest) -> dict[str, Any]:
    vectors = np.ascontiguousarray(outputs[model.output_names[0]], dtype="<f4")
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = (base64.b64encode(vector.tobytes()).decode("ascii") if request.encoding == "base64"
                          else vector)
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = int(request.tokens or 0)
    return {"object": "list", "data": data, "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(error: RequestError) -> dict[str, Any]:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": str(error), "type": kind, "param": error.param, "code": error.code}}
