"""The FastAPI app of an OpenAIServer: the routes, and OpenAI error bodies for every error (never a bare 500).

    GET  /v1/models                   the served models
    POST /v1/chat/completions         chat (the model's chat template), streamed (SSE) or not
    POST /v1/completions              plain completions, streamed or not
    GET  /health                      200 only when every engine replica can serve (not just this HTTP server)
    GET  /metrics                     Prometheus text: requests, TTFT, TPOT, tokens, KV usage, queues, preemptions
    GET  /openapi.json                the request schemas
    GET  /                            a small web chat page

A completion's response carries the engine replica that served it in X-Cluster-Replica.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import Request  # module level: FastAPI resolves the routes' (string) annotations here

from cluster.admission import read_body
from cluster.protocol import APIError
from cluster.serving.server import OpenAIServer

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Cluster-Replica"  # the engine replica that answered (its Serve replica id)


def create_app(server: OpenAIServer) -> "FastAPI":
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from cluster.openapi import build_spec

    app = FastAPI(title="cluster OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_spec(app)
        return app.openapi_schema

    app.openapi = openapi

    def err(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return err(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return err(APIError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error"))

    async def completion(request: Request, chat: bool):
        server.check_auth(request.headers.get("authorization"))
        meta: dict = {}
        body, stream = await server.completion(await read_body(request, server.max_request_bytes), chat, meta)
        replica = {REPLICA_HEADER: meta["replica"]} if meta.get("replica") else {}
        if stream is not None:
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **replica})
        return JSONResponse(body, headers=replica)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, False)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request.headers.get("authorization"))
        server.admit()
        return JSONResponse(await server.list_models())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_auth(request.headers.get("authorization"))
        for m in (await server.list_models())["data"]:
            if m["id"] == model_id:
                return JSONResponse(m)
        await server.backend_for(model_id)  # raises the 404
        return JSONResponse({"id": model_id, "object": "model", "owned_by": "cluster"})

    @app.get("/health")
    async def health(request: Request):
        status, body = await server.health(detail=server.authorized(request.headers.get("authorization")))
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_auth(request.headers.get("authorization"))
        return PlainTextResponse(await server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        from cluster.deployments.webui import page

        return HTMLResponse(page(api_base=""))

    return app
