"""One rank of a model replica, as a Ray actor (`RankWorker`), and the request host of rank 0 (`RankZeroHost`).

Rank 0 runs the engine's step loop on a thread of its own process (cluster.engine.async_engine.AsyncEngine); ranks
1..N-1 run the tensor-parallel follower loop (cluster.executor.tp.run_follower) and get each step's plan from rank 0
over torch.distributed, never through Ray. Ray carries only requests in and tokens out, batched:

    add_requests([...])  many requests in one call (the deployment coalesces concurrent arrivals); prompts are
                         tokenized on a thread of their own, never on the actor's event loop
    abort([...])         many aborts in one call
    poll(timeout)        every new output of every request since the last poll, in one reply; waits up to
                         `timeout` when there is none yet (a long poll), so an idle replica costs ~nothing

All outputs of a request that piled up between two polls are merged into one delta (text and tokens
concatenated), so the size of a reply is bounded by the number of requests, not tokens.
"""
from __future__ import annotations

import asyncio
import dis
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.engine.build import build_engine
from cluster.executor import resolve_model as _resolve  # RankWorker.run_follower's name for it

if TYPE_CHECKING:
    from cluster.config import GenerationConfig
    from cluster.engine.multimodal import ImagePrompt

log = logging.getLogger(__name__)

# The shortest gap between two poll replies while outputs keep coming (see RankZeroHost.poll).
REPLY_INTERVAL_S = 0.02

# What clients are told when the text at hand is not theirs to read (a library's, a bug's, another request's).
BAD_PROMPT = "the prompt could not be tokenized: pass a string, token ids, or messages"
ENGINE_FAILED = "engine replica failed; the request was not completed, retry it"
INTERNAL = "internal error"


def _written_for_users(e: BaseException) -> bool:
    """True when `e` came from a `raise` statement in the cluster package: those messages are written for callers.
    A library's error is not, nor a C extension's (its innermost Python frame is our call, not a raise)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module != "cluster" and not module.startswith("cluster."):
        return False
    code = tb.tb_frame.f_code.co_code
    return 0 <= tb.tb_lasti < len(code) and dis.opname[code[tb.tb_lasti]] == "RAISE_VARARGS"


def _error_for(e: BaseException, rid: str, param: str | None = None, *, preparing: bool = False) -> dict:
    """The error request `rid`'s client gets for `e`. Our own messages go as they are; any other text stays in the
    log, and the client gets a generic message (naming `param` when the prompt was being prepared)."""
    from pydantic import ValidationError

    from cluster.engine.errors import (EngineDeadError, EngineOverloadedError, PromptTooLongError, RankLostError,
                                       RequestFailedError)
    from cluster.protocol import error_dict, validation_error

    if isinstance(e, PromptTooLongError):
        return error_dict("prompt_too_long", str(e), prompt_tokens=e.prompt_tokens, max_tokens=e.max_new_tokens,
                          session_len=e.session_len, param=param)
    if isinstance(e, EngineOverloadedError):
        return error_dict("overloaded", str(e), retry_after=1)
    if isinstance(e, RankLostError):  # which rank was lost, and how: written for the clients it fails
        return error_dict("engine_dead", str(e), retry_after=5)
    if isinstance(e, EngineDeadError):  # its text is the engine's death, logged where it died
        return error_dict("engine_dead", ENGINE_FAILED, retry_after=5)
    if isinstance(e, RequestFailedError):  # written for the client: it names the exception's class only
        return error_dict("internal", str(e))
    if isinstance(e, ValidationError):
        return error_dict("bad_request", validation_error(e).message)
    if isinstance(e, (ValueError, TypeError)) and _written_for_users(e):
        return error_dict("bad_request", str(e) or type(e).__name__, param=param)
    if type(e).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):  # jinja chat templates
        return error_dict("bad_request", f"chat template: {e}", param="messages")
    if preparing and isinstance(e, (ValueError, TypeError, OverflowError)):  # the tokenizer's word on the input
        log.warning("request %s: prompt refused by the tokenizer: %s: %s", rid, type(e).__name__, e)
        return error_dict("bad_request", BAD_PROMPT, param=param)
    log.error("request %s failed", rid, exc_info=e)
    return error_dict("internal", INTERNAL)


class _Sink:
    """Where the engine thread puts one request's outputs: tagged with the request id into the host's inbox."""

    __slots__ = ("rid", "host")

    def __init__(self, rid: str, host: "RankZeroHost"):
        self.rid, self.host = rid, host

    def put(self, item) -> None:
        self.host._deliver(self.rid, item)


@dataclass
class _Prepared:
    """A request ready for engine.submit (see RankZeroHost._prepare)."""

    rid: str
    ids: list[int] | ImagePrompt
    gen: GenerationConfig
    logprobs: bool
    param: str | None


class RankZeroHost:
    """Requests in, batched outputs out, around an AsyncEngine-like object. No Ray here: the Ray actor and the
    in-process (test, no-Ray) paths share it. Call it from one asyncio loop; the engine's thread only appends."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop or asyncio.get_event_loop()
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._signaled = False
        self._event = asyncio.Event()
        self._want_lp: set[str] = set()
        self._tok_cache: dict[int, str] = {}
        self._last_reply = 0.0
        self._urgent = False  # the inbox holds a finished request or an error: reply without holding
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-prompt")
        self._preparing: set[str] = set()  # request ids whose add is on the prepare thread
        self._aborted_early: set[str] = set()  # ... and that were aborted meanwhile

    # -- the engine thread side ----------------------------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        urgent = isinstance(item, BaseException) or item.finish_reason is not None
        with self._lock:
            self._inbox.append((rid, item))
            if self._signaled and (self._urgent or not urgent):
                return
            self._signaled = True
            self._urgent = self._urgent or urgent
        self.loop.call_soon_threadsafe(self._event.set)

    # -- calls ---------------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        tok = self.engine.tokenizer
        return {"model_name": self.engine.model_name, "session_len": self.engine.session_len,
                "max_token_chars": getattr(tok, "max_token_chars", None)}

    def add_requests(self, items: list[dict]) -> list[dict]:
        """items: {"rid", "prompt", "gen" (GenerationConfig fields; max_new_tokens None = rest of the session),
        "logprobs": bool, "param"}. Returns per item {"ok": True, "prompt_tokens": n} or {"ok": False, "error": {..}}.
        Tokenizes on the calling thread: the Ray actor uses add_requests_async."""
        return [self._submit(p) for p in self._prepare_all(items)]

    async def add_requests_async(self, items: list[dict]) -> list[dict]:
        """add_requests with the prompts prepared on the host's one prepare thread, so a big prompt never stalls
        this loop (the poll replies of every other stream); one thread, so adds reach the engine in order."""
        rids = [it["rid"] for it in items]
        self._preparing.update(rids)
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(self._prep, self._prepare_all, items)
        finally:
            self._preparing.difference_update(rids)
        results = [self._submit(p) for p in prepared]
        self._aborted_early.difference_update(rids)
        return results

    def _prepare_all(self, items: list[dict]) -> list[_Prepared | dict]:
        return [self._prepare(it) for it in items]

    def _prepare(self, it: dict) -> _Prepared | dict:
        """One item made ready for the engine (tokens, images, GenerationConfig), or its error result. Any thread:
        this is the part that can take long."""
        from cluster.config import GenerationConfig
        from cluster.engine.multimodal import check_inline_images
        from cluster.protocol import error_dict

        rid, param = it["rid"], it.get("param")
        try:  # a remote caller's prompt: never one of this server's files
            check_inline_images(it["prompt"])
        except ValueError as e:
            return {"ok": False, "error": error_dict("bad_request", str(e), param="messages")}
        try:
            ids = self.engine.prepare_prompt(it["prompt"])  # token ids, or token ids and images
            gen = dict(it["gen"])
            if gen.get("max_new_tokens") is None:
                gen["max_new_tokens"] = max(1, self.engine.session_len - len(ids))
            return _Prepared(rid, ids, GenerationConfig(**gen), bool(it.get("logprobs")), param)
        except Exception as e:  # noqa: BLE001 - each request gets its own error
            return {"ok": False, "error": _error_for(e, rid, param, preparing=True)}

    def _submit(self, p: _Prepared | dict) -> dict:
        """On the host's loop: a prepared request into the engine, unless it was aborted while it was prepared."""
        from cluster.protocol import error_dict

        if isinstance(p, dict):
            return p
        if p.rid in self._aborted_early:
            return {"ok": False, "error": error_dict("aborted", "the request was aborted before it started")}
        try:
            if p.logprobs:
                self._want_lp.add(p.rid)
            self.engine.submit(p.ids, p.gen, p.rid, None, _Sink(p.rid, self))
            return {"ok": True, "prompt_tokens": len(p.ids)}
        except Exception as e:  # noqa: BLE001 - each request gets its own error
            self._want_lp.discard(p.rid)
            return {"ok": False, "error": _error_for(e, p.rid, p.param, preparing=True)}

    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            self._want_lp.discard(rid)
            if rid in self._preparing:
                self._aborted_early.add(rid)  # not in the engine yet: _submit drops it
            else:
                self.engine.abort(rid)

    async def poll(self, timeout: float = 1.0) -> dict:
        if not self._inbox:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        # While tokens stream, replies go out at most every REPLY_INTERVAL_S, carrying every step since the last:
        # a reply per step costs the engine's thread the GIL once a step. The first output after a quiet spell,
        # a finished request and an error go out at once.
        while self._inbox and not self._urgent:
            hold = self._last_reply + REPLY_INTERVAL_S - time.monotonic()
            if hold <= 0:
                break
            self._event.clear()  # before yielding: a wake-up sent meanwhile runs after this, so none is lost
            try:
                await asyncio.wait_for(self._event.wait(), hold)
            except asyncio.TimeoutError:
                break
        with self._lock:
            items, self._inbox = self._inbox, []
            self._signaled = self._urgent = False
        if items:
            self._last_reply = time.monotonic()
        outputs: dict[str, dict] = {}
        errors: dict[str, dict] = {}
        for rid, item in items:
            if isinstance(item, BaseException):
                errors[rid] = _error_for(item, rid)
                outputs.pop(rid, None)
                self._want_lp.discard(rid)
                continue
            acc = outputs.get(rid)
            if acc is None:
                acc = outputs[rid] = {"text": "", "token_ids": [], "logprobs": None, "finish_reason": None,
                                      "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
            acc["text"] += item.text
            acc["token_ids"] += item.token_ids
            if rid in self._want_lp and item.logprobs:
                acc["logprobs"] = (acc["logprobs"] or []) + [self._lp_entry(e) for e in item.logprobs]
            acc["finish_reason"] = item.finish_reason
            acc["prompt_tokens"] = item.input_token_len or acc["prompt_tokens"]
            acc["completion_tokens"] = max(acc["completion_tokens"], item.generate_token_len)
            acc["cached_tokens"] = getattr(item, "cached_token_len", 0)
            if item.finish_reason is not None:
                self._want_lp.discard(rid)
        dead = self.health()
        return {"outputs": outputs, "errors": errors, "stats": self.stats(), "dead": None if dead["ok"] else dead["error"]}

    def _token_text(self, tid: int) -> str:
        s = self._tok_cache.get(tid)
        if s is None:
            s = self._tok_cache[tid] = self.engine.tokenizer.decode([tid], skip_special_tokens=False)
        return s

    def _lp_entry(self, e: dict) -> dict:
        top = sorted(e.get("top_logprobs", {}).items(), key=lambda kv: -kv[1])
        return {"token": self._token_text(e["token_id"]), "token_id": e["token_id"], "logprob": e["logprob"],
                "top": [[self._token_text(t), lp] for t, lp in top]}

    def stats(self) -> dict:
        try:
            s = dict(self.engine.stats())
        except Exception as e:  # noqa: BLE001
            s = {"error": repr(e)}
        return s

    def health(self) -> dict:
        try:
            self.engine.check_health()
            return {"ok": True, "error": None}
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": str(e) or type(e).__name__}

    def shutdown(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()


class RankWorker:
    """The Ray actor of one rank (created by cluster.workers.group with `ray.remote(RankWorker)`; async methods,
    so poll's long wait never blocks add/abort/health)."""

    def __init__(self, rank: int, world_size: int, model: str | None, engine_config: dict,
                 max_waiting: int = 4096, num_threads: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.model, self.engine_config, self.max_waiting = model, engine_config, max_waiting
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.host: RankZeroHost | None = None
        self.state = "created"
        self.error: str | None = None
        self.started = time.time()

    def address(self) -> str:
        """init_method for the group's rendezvous: this node's IP and a port free on it (rank 0 hosts the store)."""
        import ray

        from cluster.executor.tp import free_port

        ip = ray.util.get_node_ip_address()
        port = free_port()
        os.environ.update(MASTER_ADDR=ip, MASTER_PORT=str(port))
        return f"tcp://{ip}:{port}"

    def _dist_env(self, init_method: str | None) -> None:
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if init_method:
            host, _, port = init_method[len("tcp://"):].rpartition(":")
            os.environ.update(MASTER_ADDR=host, MASTER_PORT=port)

    async def start(self, init_method: str | None = None) -> dict:
        """Rank 0: build the engine (weights, KV cache, step loop); returns {model_name, session_len}."""
        assert self.rank == 0, "start() is rank 0's; other ranks call run_follower()"
        self._dist_env(init_method)
        self.state = "loading"
        try:
            engine = await asyncio.to_thread(build_engine, self.model, self.engine_config, init_method,
                                             self.max_waiting)
        except BaseException as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("rank 0 failed to start: %s", traceback.format_exc())
            raise
        self.host = RankZeroHost(engine, asyncio.get_running_loop())
        self.state = "ready"
        return self.host.info()

    async def run_follower(self, init_method: str) -> int:
        """Ranks > 0: join rank 0's group and run its steps until it closes (returns) or the group breaks (raises).
        The caller keeps this call's ObjectRef: its completion means this rank is gone."""
        from cluster.config import EngineConfig
        from cluster.executor.tp import run_follower

        self._dist_env(init_method)
        ec = EngineConfig(**self.engine_config)
        self.state = "loading"
        model_dir, _, session_len = await asyncio.to_thread(_resolve, self.model, ec)
        self.state = "ready"
        try:
            return await asyncio.to_thread(run_follower, model_dir, ec, session_len, self.rank, self.world_size,
                                           init_method)
        except BaseException as e:
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            raise

    def abort_group(self, reason: str) -> None:
        """Rank 0: a follower is gone; fail every step from now on (and break a collective that waits on it)."""
        if self.host is not None:
            runner = getattr(self.host.engine.engine, "runner", None)
            if hasattr(runner, "abort"):
                runner.abort(reason)

    # -- rank 0's request interface (batched) --------------------------------------------------------------------
    async def add_requests(self, items: list[dict]) -> list[dict]:
        if self.host is None:
            from cluster.protocol import error_dict

            return [{"ok": False, "error": error_dict("unavailable", f"engine is {self.state}")}] * len(items)
        return await self.host.add_requests_async(items)

    def abort(self, rids: list[str]) -> None:
        if self.host is not None:
            self.host.abort(rids)

    async def poll(self, timeout: float = 1.0) -> dict:
        if self.host is None:
            await asyncio.sleep(timeout)
            return {"outputs": {}, "errors": {}, "stats": {}, "dead": None}
        return await self.host.poll(timeout)

    def stats(self) -> dict:
        s = self.host.stats() if self.host is not None else {}
        s.update(self.health())
        return s

    def health(self) -> dict:
        if self.host is None:
            return {"ok": False, "state": self.state, "error": self.error or f"engine is {self.state}"}
        h = self.host.health()
        h["state"] = "ready" if h["ok"] else "dead"
        return h

    def info(self) -> dict:
        return self.host.info() if self.host is not None else {}

    def shutdown(self) -> None:
        if self.host is not None:
            self.host.shutdown()
