"""The API's OpenAPI document, generated from the protocol's request models (the handlers read the body themselves,
so FastAPI alone would describe no request). Clients, code generators and the schema fuzzer read it."""
from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from cluster.protocol import ChatCompletionRequest, CompletionRequest

_REF = "#/components/schemas/{model}"
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERRORS = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
           "413": "request body too large", "503": "overloaded, draining or an engine replica failed (Retry-After)"}


def _responses(ok: str) -> dict:
    err = {"content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
    return {"200": {"description": ok}, **{code: {"description": d, **err} for code, d in _ERRORS.items()}}


def build_spec(app) -> dict[str, Any]:
    """FastAPI's document for `app`, with each completion route's request body and error responses filled in."""
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                       description="OpenAI-compatible API of cluster (see docs/serving.md)")
    keys, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                    ref_template=_REF)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    schemas["ErrorResponse"] = _ERROR
    bodies = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
    security = {"bearer": {"type": "http", "scheme": "bearer"}}
    spec["components"]["securitySchemes"] = security
    for path, model in bodies.items():
        op = spec["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": keys[(model, "validation")]}}}
        op["responses"] = _responses("a completion (JSON), or a stream of server-sent events when stream is true")
        op["security"] = [{"bearer": []}]
    return spec
