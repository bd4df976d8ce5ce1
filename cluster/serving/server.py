"""The OpenAI server behind the HTTP app: model names, auth, drain, completions (a request -> a Job -> events ->
a response), /health and /metrics. One per router replica; it reaches the engines through backends."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import weakref
from dataclasses import replace
from typing import Any, AsyncIterator

from cluster.admission import MAX_REQUEST_BYTES, Cached, check_fits, inline_images
from cluster.engine.multimodal import has_images
from cluster.messages import EngineStats, Failed, ReplicaInfo, Started
from cluster.protocol import APIError, ChatCompletionRequest, CompletionRequest, make_job, new_id, parse
from cluster.serving.backends import Backend, EventStream
from cluster.serving.failover import MAX_MOVES, RETRY_DELAY_S, STALL_TIMEOUT_S, FailoverStream, replica_failed
from cluster.serving.metrics import RouterMetrics
from cluster.serving.responses import ResponseBuilder, backend_error

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"  # the metrics label of requests for models that are not served: clients pick the name
STATS_TTL_S = 0.5  # /health and /metrics reuse the engines' answers this long


class _Refused(Exception):
    """An engine replica could not take a request (not the request's fault): `error` is what the client gets if no
    other attempt succeeds."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


class OpenAIServer:
    def __init__(self, backends: list[Backend], api_key: str | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, image_dir: str | None = None,
                 stall_timeout_s: float = STALL_TIMEOUT_S):
        self.backends = backends
        self.stall_timeout_s = stall_timeout_s  # a running request's replica silent this long: it moves (failover)
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.image_dir = image_dir
        self.metrics = RouterMetrics()
        self._health = Cached(self._health_now, STATS_TTL_S)
        self._engine_stats = Cached(self._engine_stats_now, STATS_TTL_S)
        self._info: dict[int, ReplicaInfo] = {}  # id(backend) -> its engine's facts (session_len, max_token_chars)
        self.draining = False
        self.in_flight = 0
        self._names: dict[str, Any] = {}  # model id (and aliases) -> backend
        self._listed: list[tuple[str, Backend, ReplicaInfo]] = []
        self._resolved = False
        self._resolve_lock = asyncio.Lock()

    # -- models ----------------------------------------------------------------------------------------------------
    async def _resolve(self, force: bool = False) -> None:
        async with self._resolve_lock:
            if self._resolved and not force:
                return
            names: dict[str, Any] = {}
            listed = []
            ok = True
            for b in self.backends:
                try:
                    info = await asyncio.wait_for(b.info(), 30)
                except Exception as e:  # noqa: BLE001 - still starting: listed under its configured name
                    log.warning("model info unavailable: %s", e)
                    info, ok = ReplicaInfo(), False
                served = b.name or info.model_name
                if not served:
                    continue
                listed.append((served, b, info))
                self._info[id(b)] = info
                names[served] = b
                if info.model_name:
                    names.setdefault(info.model_name, b)
            self._names, self._listed, self._resolved = names, listed, ok

    async def backend_for(self, model: str) -> Backend:
        await self._resolve()
        b = self._names.get(model)
        if b is None and not self._resolved:
            await self._resolve(force=True)
            b = self._names.get(model)
        if b is None:
            known = ", ".join(sorted(n for n, _, _ in self._listed)) or "none"
            raise APIError(404, f"The model '{model}' does not exist (served models: {known})", param="model",
                           code="model_not_found")
        return b

    async def list_models(self) -> dict:
        await self._resolve()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "cluster", "max_model_len": info.session_len}
            for name, _, info in self._listed]}

    # -- auth, drain -------------------------------------------------------------------------------------------------
    def authorized(self, authorization: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_auth(self, authorization: str | None) -> None:
        if not self.authorized(authorization):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def admit(self) -> None:
        if self.draining:
            raise APIError(503, "server is shutting down; retry on another instance", type="server_error",
                           code="shutting_down", retry_after=5)

    # -- completions ---------------------------------------------------------------------------------------------------
    async def _start(self, backend: Backend, job) -> tuple[EventStream, Started]:
        """Send the job; wait for its first event, so a bad request is an HTTP error, not a broken stream. A refusal
        that is the replica's, not the request's (rebuilding its workers, shutting down, gone: replica_failed),
        is tried again, MAX_MOVES times with a doubling pause, while the request routers learn from the replicas'
        routing stats to skip one that is not ready (replica_choice.ready): a replica killed under load otherwise
        turns every request least-pending-work sends it into a 503 until it is back."""
        delay = RETRY_DELAY_S
        for attempt in range(MAX_MOVES + 1):
            try:
                return await self._first(backend, job if not attempt else replace(
                    job, request_id=f"{job.request_id}-r{attempt}"))
            except _Refused as e:
                if attempt == MAX_MOVES:
                    raise e.error from None
                log.warning("request %s: an engine replica refused it (%s); trying again in %.1f s",
                            job.request_id, e.error.message, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _first(self, backend: Backend, job) -> tuple[EventStream, Started]:
        """The job's stream and its Started; APIError when it failed, _Refused when the replica could not take it."""
        events = backend.generate(job)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "engine replica closed the request without an answer", type="server_error") from None
        except BaseException as e:
            events.close()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, APIError)):
                raise
            if replica_failed(e):
                raise _Refused(backend_error(e)) from None
            raise backend_error(e) from None
        if isinstance(first, Failed):
            events.close()
            if replica_failed(first):
                raise _Refused(APIError.from_error(first.error))
            raise APIError.from_error(first.error)
        return events, first

    def _counting_moves(self, model: str):
        """FailoverStream's callback: the failover counters of /metrics, and /health asks the engines again."""
        def on_move(outcome: str, moved: int) -> None:
            self.stats_changed()
            if outcome == "moved":
                self.metrics.failovers.labels(model).inc()
                if moved == 1:
                    self.metrics.moved_requests.labels(model).inc()
            else:
                self.metrics.failover_exhausted.labels(model).inc()
        return on_move

    async def _job(self, req, chat: bool):
        """(prompts, job) of a validated request."""
        if chat:
            prompts = [req.plain_messages()]
            if has_images(prompts[0]):
                prompts = [await inline_images(prompts[0], self.image_dir)]
            top = (req.top_logprobs or 0) if req.logprobs else None
            # default max_tokens: the rest of the session, like vLLM
            return prompts, make_job(new_id("chatcmpl"), prompts, req, None, top, bool(req.logprobs), "messages")
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        # default max_tokens: OpenAI's 16 for /v1/completions
        return prompts, make_job(new_id("cmpl"), prompts, req, 16, req.logprobs, req.logprobs is not None, "prompt")

    async def completion(self, raw: bytes, chat: bool,
                         meta: dict | None = None) -> tuple[dict | None, AsyncIterator[bytes] | None]:
        """Returns (JSON body, None) or (None, SSE byte stream); `meta` gets the engine replica that took the request
        ("replica"), which the app returns as a header (operators, and the cache-aware routing test, read it)."""
        endpoint = "chat" if chat else "completions"
        model = UNKNOWN_MODEL
        self.admit()
        self.in_flight += 1  # from here on, a drain waits for this request
        self.metrics.in_flight.inc()
        builder = None
        try:
            t0 = time.perf_counter()
            req = parse(ChatCompletionRequest if chat else CompletionRequest, raw)
            backend = await self.backend_for(req.model)
            model = req.model
            prompts, job = await self._job(req, chat)
            check_fits(prompts, req.max_tokens, self._info.get(id(backend), ReplicaInfo()), job.param)
            events, first = await self._start(backend, job)
            events = FailoverStream(backend, job, events, first, self._counting_moves(model),
                                    stall_timeout_s=self.stall_timeout_s)
            if meta is not None:
                meta["replica"] = first.replica
            builder = ResponseBuilder(self, req, job, first, endpoint, t0, chat, prompts)  # owns in_flight now
        except APIError as e:
            self.metrics.requests.labels(model, endpoint, str(e.status)).inc()
            if e.status >= 500:
                self.stats_changed()
            raise
        finally:
            if builder is None:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        if req.stream:
            gen = builder.stream(events)
            # a client gone before the response started never runs the generator's `finally`: clean up on collection
            weakref.finalize(gen, builder.abandon, events)
            return None, gen
        try:
            return await builder.collect(events), None
        finally:
            builder.done()

    # -- health, metrics ----------------------------------------------------------------------------------------------
    async def health(self, detail: bool = True) -> tuple[int, dict]:
        """(status, body); without `detail` (a caller without the API key) the body says only ok or not: the
        reasons name replicas and carry engine errors, which are for operators."""
        status, body = await self._health.get()
        if self.draining:
            status, body = 503, {**body, "status": "draining"}
        return status, body if detail else {"status": body["status"]}

    def stats_changed(self) -> None:
        """An engine replica just failed a request: /health and /metrics ask the engines again."""
        self._health.invalidate()
        self._engine_stats.invalidate()

    async def _health_now(self) -> tuple[int, dict]:
        await self._resolve()
        models = {}
        ok = True
        per_model = await self._engine_stats.get()  # the same engine calls as /metrics, shared
        for name, b, _ in self._listed or [(b.name or "?", b, None) for b in self.backends]:
            reps = per_model[name] if name in per_model else await b.replicas()
            dep_ok, dep_status = await b.deployment_ok()
            bad = [r for r in reps if not r.ok]
            m_ok = dep_ok and bool(reps) and not bad
            ok = ok and m_ok
            models[name] = {"ok": m_ok, "deployment": dep_status, "replicas": len(reps),
                            "errors": [f"{r.replica}: {r.error}" for r in bad] or
                            ([] if reps else ["no engine replica is running"])}
        if not self.backends:
            ok = False
        body = {"status": "ok" if ok else "unhealthy", "models": models}
        return (200 if ok else 503), body

    async def metrics_text(self) -> str:
        self.metrics.engines.update(await self._engine_stats.get())
        self.metrics.routing.models = {b.deployment: name for name, b, _ in self._listed
                                       if getattr(b, "deployment", None)}  # routers count by deployment
        return self.metrics.text()

    async def _engine_stats_now(self) -> dict[str, list[EngineStats]]:
        await self._resolve()
        per_model = {}
        for name, b, _ in self._listed:
            try:
                per_model[name] = await b.replicas()
            except Exception as e:  # noqa: BLE001
                log.warning("engine stats unavailable for %s: %s", name, e)
        return per_model
