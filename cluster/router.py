"""The HTTP ingress: an OpenAI-compatible API (FastAPI) as a Ray Serve deployment.

    GET  /v1/models                   the served models
    POST /v1/chat/completions         chat (the model's chat template), streamed (SSE) or not
    POST /v1/completions              plain completions, streamed or not
    GET  /health                      200 only when every engine replica can serve (not just this HTTP server)
    GET  /metrics                     Prometheus text: requests, TTFT, TPOT, tokens, KV usage, queues, preemptions
    GET  /                            a small web chat page

Requests are validated here (pydantic; every caller mistake is a 400 with an OpenAI error body, never a 500), turned
into a *job* (cluster.protocol), and sent to the model's engine deployment through a Serve handle. Replica choice
is `PendingWorkRouter`: two random replicas, the one with less pending work (prompt + max tokens not yet done) wins.

`build_app(args)` is the Serve application builder (`import_path: cluster.router:build_app` in a Serve config, or
`cluster serve`). This module imports no torch: the router process holds no model.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
import weakref
from collections import defaultdict
from typing import Any, AsyncIterator, Optional

from fastapi import Request  # module level: FastAPI resolves the routes' (string) annotations here
from pydantic import BaseModel, ConfigDict, Field

from cluster.admission import MAX_REQUEST_BYTES, Cached, check_fits, inline_images, read_body
from cluster.engine.multimodal import has_images
from cluster.protocol import (APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                              make_job, new_id, now, parse, sse, usage_dict)

log = logging.getLogger(__name__)

# -- metrics ----------------------------------------------------------------------------------------------------------
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()

        r = self.registry = CollectorRegistry()
        self.requests = Counter("cluster_requests", "HTTP API requests by outcome", ["model", "endpoint", "status"],
                                registry=r)
        self.in_flight = Gauge("cluster_requests_in_flight", "requests being served", registry=r)
        self.ttft = Histogram("cluster_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("cluster_time_per_output_token_seconds", "time per output token after the first",
                              ["model"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("cluster_e2e_request_latency_seconds", "request latency", ["model"],
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cluster_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("cluster_generation_tokens", "tokens generated", ["model"], registry=r)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


_ENGINE_GAUGES = [  # (metric, stats key, help, type)
    ("cluster_engine_healthy", "ok", "1 when the engine replica can serve", "gauge"),
    ("cluster_kv_cache_usage_ratio", "kv_usage", "share of KV cache blocks in use", "gauge"),
    ("cluster_kv_cache_blocks_free", "kv_blocks_free", "free KV cache blocks", "gauge"),
    ("cluster_kv_cache_blocks_total", "kv_blocks_total", "KV cache blocks", "gauge"),
    ("cluster_num_requests_running", "num_running", "requests in the running batch", "gauge"),
    ("cluster_num_requests_waiting", "num_waiting", "requests queued in the engine", "gauge"),
    ("cluster_num_preemptions_total", "num_preemptions", "requests preempted for KV space", "counter"),
    ("cluster_prefix_cache_hit_rate", "prefix_cache_hit_rate", "prefix cache hits / queries", "gauge"),
    ("cluster_engine_prompt_tokens_total", "tokens_in", "prompt tokens the engine took in", "counter"),
    ("cluster_engine_generation_tokens_total", "tokens_out", "tokens the engine generated", "counter"),
]


def engine_metrics_text(per_model: dict[str, list[dict]]) -> str:
    lines = []
    for metric, key, help_, kind in _ENGINE_GAUGES:
        lines.append(f"# HELP {metric} {help_}")
        lines.append(f"# TYPE {metric} {kind}")
        for model, replicas in per_model.items():
            for r in replicas:
                v = r.get(key)
                if v is None:
                    continue
                lines.append(f'{metric}{{model="{_esc(model)}",replica="{_esc(str(r.get("replica", "")))}"}} '
                             f"{float(v)}")
    return "\n".join(lines) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- backends: how the router reaches one model's engine replicas ------------------------------------------------------
class EventStream:
    """Events of one job (see ReplicaCore.generate); `close()` is synchronous (it runs in cancelled code)."""

    def __init__(self, it: AsyncIterator[dict], close=None):
        self._it, self._close = it, close

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        return await self._it.__anext__()

    def close(self) -> None:
        if self._close is not None:
            try:
                self._close()
            except Exception:  # noqa: BLE001
                pass


class LocalBackend:
    """A ReplicaCore in this process (tests, and serving without Ray)."""

    def __init__(self, core, name: str | None = None):
        self.core, self.name = core, name

    async def info(self) -> dict:
        return dict(self.core.info)

    def generate(self, job: dict) -> EventStream:
        agen = self.core.generate(job)

        def close():  # its `finally` aborts the request
            asyncio.get_running_loop().create_task(agen.aclose())

        return EventStream(agen, close)

    async def replicas(self) -> list[dict]:
        if self.core.conn is None:
            return [{"replica": self.core.replica_id, "ok": False, "state": self.core.state,
                     "error": self.core.last_error}]
        try:
            s = await asyncio.wait_for(self.core.conn.client.stats(), 5)
        except Exception as e:  # noqa: BLE001
            s = {"ok": False, "error": repr(e)}
        s = {**s, "replica": self.core.replica_id}
        if self.core.state != "ready":
            s.update(ok=False, state=self.core.state)
        return [s]

    async def deployment_ok(self) -> tuple[bool, str]:
        return self.core.state == "ready", self.core.state


class ServeBackend:
    """One model's engine deployment, through a Serve handle; rank-0 workers found by name for /metrics, /health."""

    def __init__(self, handle, name: str | None, app: str, deployment: str):
        self.handle, self.name, self.app, self.deployment = handle, name, app, deployment
        self._stream_handle = handle.options(stream=True)

    async def info(self) -> dict:
        return await self.handle.info.remote()

    def generate(self, job: dict) -> EventStream:
        gen = self._stream_handle.generate.remote(job)
        return EventStream(gen.__aiter__(), gen.cancel)

    def _rank0_actors(self) -> list[tuple[str, str]]:
        import ray

        from cluster.deployments.engine import WORKER_PREFIX

        prefix = f"{WORKER_PREFIX}0|{self.app}|{self.deployment}|"
        out = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            name, ns = (a["name"], a["namespace"]) if isinstance(a, dict) else (a, None)
            if name.startswith(prefix):
                out.append((name, ns))
        return out

    async def replicas(self) -> list[dict]:
        import ray

        async def one(name, ns):
            replica = name.split("|")[3]
            try:
                actor = ray.get_actor(name, namespace=ns)
                s = await asyncio.wait_for(actor.stats.remote(), 5)
            except Exception as e:  # noqa: BLE001 - dead or gone: that is what /health reports
                s = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            return {**s, "replica": replica}

        actors = await asyncio.to_thread(self._rank0_actors)
        return list(await asyncio.gather(*[one(n, ns) for n, ns in actors]))

    async def deployment_ok(self) -> tuple[bool, str]:
        from ray import serve

        try:
            st = await asyncio.to_thread(serve.status)
            dep = st.applications[self.app].deployments[self.deployment]
            status = str(getattr(dep.status, "value", dep.status))
            return status == "HEALTHY", status
        except Exception as e:  # noqa: BLE001
            return False, f"unknown ({e})"


# -- the server -------------------------------------------------------------------------------------------------------
UNKNOWN_MODEL = "unknown"  # the metrics label of requests for models that are not served: clients pick the name
STATS_TTL_S = 0.5  # /health and /metrics reuse the engines' answers this long


class OpenAIServer:
    def __init__(self, backends: list, api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 image_dir: str | None = None):
        self.backends = backends
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.image_dir = image_dir
        self.metrics = Metrics()
        self._health = Cached(self._health_now, STATS_TTL_S)
        self._engine_stats = Cached(self._engine_stats_now, STATS_TTL_S)
        self._info: dict[int, dict] = {}  # id(backend) -> its engine's facts (session_len, max_token_chars)
        self.draining = False
        self.in_flight = 0
        self._names: dict[str, Any] = {}  # model id (and aliases) -> backend
        self._listed: list[tuple[str, Any, dict]] = []
        self._resolved = False
        self._resolve_lock = asyncio.Lock()

    # -- models ----------------------------------------------------------------------------------------------------------
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
                    info, ok = {}, False
                served = b.name or info.get("model_name")
                if not served:
                    continue
                listed.append((served, b, info))
                self._info[id(b)] = info
                names[served] = b
                if info.get("model_name"):
                    names.setdefault(info["model_name"], b)
            self._names, self._listed, self._resolved = names, listed, ok

    async def backend_for(self, model: str):
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
            {"id": name, "object": "model", "created": 0, "owned_by": "cluster",
             "max_model_len": info.get("session_len")} for name, _, info in self._listed]}

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

    def _admit(self) -> None:
        if self.draining:
            raise APIError(503, "server is shutting down; retry on another instance", type="server_error",
                           code="shutting_down", retry_after=5)

    # -- completions ---------------------------------------------------------------------------------------------------
    async def _start(self, backend, job: dict) -> tuple[EventStream, dict]:
        """Send the job; wait for its first event, so a bad request is an HTTP error, not a broken stream."""
        events = backend.generate(job)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "engine replica closed the request without an answer", type="server_error") from None
        except BaseException as e:
            events.close()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, APIError)):
                raise
            raise _backend_error(e) from None
        if first["type"] == "error":
            events.close()
            raise APIError.from_dict(first["error"])
        return events, first

    async def completion(self, raw: bytes, chat: bool) -> tuple[dict | None, AsyncIterator[bytes] | None]:
        """Returns (JSON body, None) or (None, SSE byte stream)."""
        endpoint = "chat" if chat else "completions"
        model = UNKNOWN_MODEL
        self._admit()
        self.in_flight += 1  # from here on, a drain waits for this request
        self.metrics.in_flight.inc()
        ctx = None
        try:
            t0 = time.perf_counter()
            req = parse(ChatCompletionRequest if chat else CompletionRequest, raw)
            backend = await self.backend_for(req.model)
            model = req.model
            if chat:
                prompts = [req.plain_messages()]
                if has_images(prompts[0]):
                    prompts = [await inline_images(prompts[0], self.image_dir)]
                top = (req.top_logprobs or 0) if req.logprobs else None
                want_lp = bool(req.logprobs)
                default_max = None  # the rest of the session, like vLLM
                rid = new_id("chatcmpl")
            else:
                try:
                    prompts = req.prompts()
                except ValueError as e:
                    raise APIError(400, str(e), param="prompt") from None
                top = req.logprobs
                want_lp = req.logprobs is not None
                default_max = 16  # OpenAI's default for /v1/completions
                rid = new_id("cmpl")
            param = "messages" if chat else "prompt"
            check_fits(prompts, req.max_tokens, self._info.get(id(backend), {}), param)
            job = make_job(rid, prompts, req, default_max, top, want_lp)
            job["param"] = param
            events, first = await self._start(backend, job)
            ctx = _Ctx(self, req, job, first, endpoint, t0, chat, prompts)  # owns the in-flight count now
        except APIError as e:
            self.metrics.requests.labels(model, endpoint, str(e.status)).inc()
            if e.status >= 500:
                self.stats_changed()
            raise
        finally:
            if ctx is None:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        if req.stream:
            gen = ctx.stream(events)
            # a client gone before the response started never runs the generator's `finally`: clean up on collection
            weakref.finalize(gen, ctx.abandon, events)
            return None, gen
        try:
            return await ctx.collect(events), None
        finally:
            ctx.done()

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
        for name, b, _ in self._listed or [(b.name or "?", b, {}) for b in self.backends]:
            reps = per_model[name] if name in per_model else await b.replicas()
            dep_ok, dep_status = await b.deployment_ok()
            bad = [r for r in reps if not r.get("ok")]
            m_ok = dep_ok and bool(reps) and not bad
            ok = ok and m_ok
            models[name] = {"ok": m_ok, "deployment": dep_status, "replicas": len(reps),
                            "errors": [f"{r['replica']}: {r.get('error')}" for r in bad] or
                            ([] if reps else ["no engine replica is running"])}
        if not self.backends:
            ok = False
        body = {"status": "ok" if ok else "unhealthy", "models": models}
        return (200 if ok else 503), body

    async def metrics_text(self) -> str:
        return self.metrics.text() + engine_metrics_text(await self._engine_stats.get())

    async def _engine_stats_now(self) -> dict[str, list[dict]]:
        await self._resolve()
        per_model = {}
        for name, b, _ in self._listed:
            try:
                per_model[name] = await b.replicas()
            except Exception as e:  # noqa: BLE001
                log.warning("engine stats unavailable for %s: %s", name, e)
        return per_model


def _backend_error(e: BaseException) -> APIError:
    name = type(e).__name__
    if name == "BackPressureError":
        return APIError(503, "engine replicas are overloaded (request queue full); retry later",
                        type="server_overloaded", code="overloaded", retry_after=2)
    if name in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
                "DeploymentUnavailableError", "RayServeException"):
        return APIError(503, f"engine replica unavailable ({name}); retry", type="server_error",
                        code="engine_unavailable", retry_after=5)
    log.error("backend error: %s", e, exc_info=e)
    return APIError(500, f"internal error ({name}); retry, and report it if it persists", type="server_error",
                    code="internal_error")


class _Ctx:
    """One request's response building: accumulates (non-streamed) or formats chunks (streamed); records metrics."""

    def __init__(self, server: OpenAIServer, req, job, first, endpoint, t0, chat, prompts):
        self.server, self.req, self.job, self.endpoint, self.t0, self.chat = server, req, job, endpoint, t0, chat
        self.model = req.model
        self.prompts = prompts
        self.prompt_tokens = first.get("prompt_tokens", {})
        self.n = len(job["choices"])
        self.completion_tokens = defaultdict(int)
        self.cached = {}
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.created = now()
        self.status = "ok"
        self._done = False

    def usage(self) -> dict:
        # a prompt counts once however many choices it has (like OpenAI)
        per_prompt = {}
        for idx, n in self.prompt_tokens.items():
            per_prompt.setdefault(int(idx) // self.req.n, n)
        cached = {}
        for idx, n in self.cached.items():
            cached.setdefault(int(idx) // self.req.n, n)
        return usage_dict(sum(per_prompt.values()), sum(self.completion_tokens.values()), sum(cached.values()))

    def _see(self, c: dict) -> None:
        t = time.perf_counter()
        if c["token_ids"]:
            if self.t_first is None:
                self.t_first = t
                self.server.metrics.ttft.labels(self.model).observe(t - self.t0)
            self.t_last = t
        self.completion_tokens[c["index"]] = max(self.completion_tokens[c["index"]], c["completion_tokens"])
        self.cached[c["index"]] = c.get("cached_tokens", 0)

    def abandon(self, events: EventStream) -> None:
        if not self._done:
            events.close()
            self.status = "cancelled"
            self.done()

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        m = self.server.metrics
        self.server.in_flight -= 1
        m.in_flight.dec()
        m.requests.labels(self.model, self.endpoint, self.status).inc()
        u = self.usage()
        m.prompt_tokens.labels(self.model).inc(u["prompt_tokens"])
        m.generation_tokens.labels(self.model).inc(u["completion_tokens"])
        m.e2e.labels(self.model).observe(time.perf_counter() - self.t0)
        per_choice = u["completion_tokens"] / max(1, self.n)
        if self.t_first is not None and self.t_last is not None and per_choice > 1:
            m.tpot.labels(self.model).observe((self.t_last - self.t_first) / (per_choice - 1))

    # -- non-streamed ----------------------------------------------------------------------------------------------
    async def collect(self, events: EventStream) -> dict:
        texts = defaultdict(str)
        lps: dict[int, list] = defaultdict(list)
        finish: dict[int, str | None] = {}
        try:
            async for ev in events:
                if ev["type"] == "error":
                    self.status = "error"
                    self.server.stats_changed()
                    raise APIError.from_dict(ev["error"])
                for c in ev["choices"]:
                    self._see(c)
                    texts[c["index"]] += c["text"]
                    if c.get("logprobs"):
                        lps[c["index"]] += c["logprobs"]
                    if c["finish_reason"] is not None:
                        finish[c["index"]] = c["finish_reason"]
        except (APIError, asyncio.CancelledError):
            self.status = "error" if self.status == "ok" else self.status
            raise
        except Exception as e:  # noqa: BLE001
            self.status = "error"
            raise _backend_error(e) from None
        finally:
            events.close()
        choices = []
        for c in self.job["choices"]:
            i = c["index"]
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": chat_logprobs(lps[i]) if self.job["logprobs"] else None,
                                "finish_reason": finish.get(i, "stop")})
            else:
                text = texts[i]
                prefix = ""
                if self.req.echo:
                    p = self.prompts[i // self.req.n]
                    prefix = p if isinstance(p, str) else ""
                choices.append({"index": i, "text": prefix + text,
                                "logprobs": completion_logprobs(lps[i], len(prefix)) if self.job["logprobs"] else None,
                                "finish_reason": finish.get(i, "stop")})
        return {"id": self.job["request_id"], "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # -- streamed ------------------------------------------------------------------------------------------------------
    def _chunk(self, choices: list, usage: dict | None = None, with_usage_key: bool = False) -> bytes:
        body = {"id": self.job["request_id"], "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or with_usage_key:
            body["usage"] = usage
        return sse(body)

    async def stream(self, events: EventStream) -> AsyncIterator[bytes]:
        inc = self.req.include_usage
        offsets = defaultdict(int)
        finished: set[int] = set()
        try:
            if self.chat:
                yield self._chunk([{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None} for c in self.job["choices"]],
                                  with_usage_key=inc)
            elif self.req.echo:
                for c in self.job["choices"]:
                    p = self.prompts[c["index"] // self.req.n]
                    if isinstance(p, str):
                        offsets[c["index"]] = len(p)
                        yield self._chunk([{"index": c["index"], "text": p, "logprobs": None,
                                            "finish_reason": None}], with_usage_key=inc)
            async for ev in events:
                if ev["type"] == "error":
                    self.status = "error"
                    self.server.stats_changed()
                    yield sse(APIError.from_dict(ev["error"]).body())
                    return
                out = []
                for c in ev["choices"]:
                    self._see(c)
                    if not c["text"] and c["finish_reason"] is None and not c.get("logprobs"):
                        continue  # held-back text (a partial character or a possible stop word)
                    i = c["index"]
                    if self.chat:
                        out.append({"index": i, "delta": {"content": c["text"]} if c["text"] else {},
                                    "logprobs": chat_logprobs(c.get("logprobs") or []) if self.job["logprobs"] else None,
                                    "finish_reason": c["finish_reason"]})
                    else:
                        out.append({"index": i, "text": c["text"],
                                    "logprobs": completion_logprobs(c.get("logprobs") or [], offsets[i])
                                    if self.job["logprobs"] else None, "finish_reason": c["finish_reason"]})
                        offsets[i] += len(c["text"])
                finished.update(c["index"] for c in ev["choices"] if c["finish_reason"] is not None)
                if out:
                    last = len(finished) == self.n and not inc  # without include_usage: usage rides on the last
                    yield self._chunk(out, usage=self.usage() if last else None, with_usage_key=inc)
            if inc:
                yield self._chunk([], usage=self.usage())
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.status = "cancelled"
            raise
        except GeneratorExit:
            self.status = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            self.status = "error"
            yield sse(_backend_error(e).body())
        finally:
            events.close()
            self.done()


# -- FastAPI app -----------------------------------------------------------------------------------------------------
def create_app(server: OpenAIServer):
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
        body, stream = await server.completion(await read_body(request, server.max_request_bytes), chat)
        if stream is not None:
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, False)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request.headers.get("authorization"))
        server._admit()
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


# -- replica choice -------------------------------------------------------------------------------------------------
def _make_request_router():
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class PendingWorkRouter(FIFOMixin, RequestRouter):
        """Power of two choices on pending work: two random replicas; prefer the one with fewer tokens still to do
        (prompt + max tokens of the requests this router sent it and that have not completed; or what the replica
        itself reports, if more: other routers send it work too). Serve falls back to the second when the first is
        at max_ongoing_requests. A request is charged to the replica it is about to go to as soon as it is chosen
        (then moved if Serve sends it elsewhere), so a burst of concurrent arrivals spreads evenly."""

        def initialize_state(self, **kwargs):
            self._work: dict[Any, int] = defaultdict(int)  # replica id -> pending work
            self._charged: dict[str, tuple[Any, int, float]] = {}  # request id -> (replica id, work, when)

        def _state(self):
            if not hasattr(self, "_work"):
                self.initialize_state()

        def _load(self, replica) -> float:
            reported = (replica.routing_stats or {}).get("pending_work", 0) or 0
            return max(self._work.get(replica.replica_id, 0), reported)

        def _charge(self, rid: str, replica_id, work: int) -> None:
            self._uncharge(rid)
            if work:
                self._charged[rid] = (replica_id, work, time.monotonic())
                self._work[replica_id] += work

        def _uncharge(self, rid: str) -> None:
            old = self._charged.pop(rid, None)
            if old is not None:
                self._work[old[0]] -= old[1]
                if self._work[old[0]] <= 0:
                    self._work.pop(old[0], None)

        @staticmethod
        def _job_work(pending_request) -> int:
            args = getattr(pending_request, "args", None) or []
            if args and isinstance(args[0], dict):
                return int(args[0].get("work", 0) or 0)
            return 0

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            self._state()
            if not candidate_replicas:
                return []
            pick = random.sample(list(candidate_replicas), min(2, len(candidate_replicas)))
            pick.sort(key=self._load)
            if pending_request is not None:
                now_ = time.monotonic()
                for rid in [r for r, c in self._charged.items() if now_ - c[2] > 600]:
                    self._uncharge(rid)  # never routed nor completed (cancelled while queued)
                self._charge(pending_request.metadata.internal_request_id, pick[0].replica_id,
                             self._job_work(pending_request))
            return [[r] for r in pick]

        def on_request_routed(self, pending_request, replica_id, result):
            self._state()
            self._charge(pending_request.metadata.internal_request_id, replica_id, self._job_work(pending_request))

        def on_request_completed(self, replica_id, internal_request_id):
            self._state()
            self._uncharge(internal_request_id)

        def on_replica_actor_died(self, replica_id):
            super().on_replica_actor_died(replica_id)
            self._state()
            for rid in [r for r, c in self._charged.items() if c[0] == replica_id]:
                self._uncharge(rid)

    return PendingWorkRouter


def __getattr__(name: str):
    if name == "PendingWorkRouter":  # built on demand: importing this module needs no Ray
        return _make_request_router()
    raise AttributeError(name)


# -- the Serve application ------------------------------------------------------------------------------------------
class ServeArgs(BaseModel):
    """Arguments of `build_app`: the `args:` of a Serve config application, or `cluster serve`'s options."""

    model_config = ConfigDict(extra="forbid")

    models: list[Any] = Field(default_factory=lambda: [{}], description="ModelSpec entries (cluster.deployments.engine)")
    api_key: Optional[str] = Field(None, description="require 'Authorization: Bearer <key>'; default: $CLUSTER_API_KEY")
    max_request_bytes: int = Field(MAX_REQUEST_BYTES, ge=1024, description="larger request bodies get 413")
    image_dir: Optional[str] = Field(None, description="image_url may name files under this directory (relative "
                                     "to it); otherwise only inline data: URLs are accepted over HTTP")
    router_replicas: int = Field(1, ge=1)
    router_max_ongoing_requests: int = Field(10000, ge=1)

    def specs(self):
        from cluster.deployments.engine import ModelSpec

        specs = [ModelSpec.model_validate(m) for m in self.models]
        if not specs:
            raise ValueError("at least one model is needed")
        names = [s.deployment_name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a deployment name ({names}); give each a distinct 'name'")
        return specs


class RouterIngress:
    """The ingress deployment class (wrapped by serve.ingress in build_app)."""

    async def __init__(self, args: dict, *engines):
        from ray import serve

        a = ServeArgs.model_validate(args)
        ctx = serve.get_replica_context()
        backends = [ServeBackend(h, spec.name, ctx.app_name, spec.deployment_name)
                    for h, spec in zip(engines, a.specs())]
        self.server = OpenAIServer(backends, api_key=a.api_key or os.environ.get("CLUSTER_API_KEY"),
                                   max_request_bytes=a.max_request_bytes, image_dir=a.image_dir)

    def __serve_build_asgi_app__(self):
        return create_app(self.server)

    async def drain(self) -> int:
        """Refuse new requests from now on (503); returns how many are still in flight."""
        self.server.draining = True
        return self.server.in_flight

    async def num_in_flight(self) -> int:
        return self.server.in_flight


def build_app(args: dict | ServeArgs | None = None):
    """Serve application builder: `import_path: cluster.router:build_app` with `args:` as ServeArgs."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from cluster.deployments.engine import EngineReplica

    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args or {}))
    engines = []
    for spec in a.specs():
        opts: dict[str, Any] = dict(
            name=spec.deployment_name, num_replicas=spec.replicas, max_ongoing_requests=spec.max_ongoing_requests,
            max_queued_requests=spec.max_queued_requests, ray_actor_options={"num_cpus": 0},
            health_check_period_s=spec.health_check_period_s, health_check_timeout_s=60,
            graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=1)
        if spec.routing == "pending_work":
            opts["request_router_config"] = RequestRouterConfig(request_router_class=_make_request_router(),
                                                                request_routing_stats_period_s=2.0)
        engines.append(serve.deployment(EngineReplica).options(**opts).bind(spec.model_dump()))
    ingress = serve.deployment(serve.ingress()(RouterIngress)).options(
        name="router", num_replicas=a.router_replicas, max_ongoing_requests=a.router_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0})
    return ingress.bind(a.model_dump(), *engines)
