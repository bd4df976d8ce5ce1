"""The engine's step loop on a background thread, with thread-safe request submission and per-request streams.

Used by the pipeline's streaming API, the chat CLI and the serving worker. Requests go in through a queue the loop
drains between steps, so no caller ever touches the scheduler while a step runs."""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import traceback
from typing import AsyncIterator, Callable, Iterator

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine, RequestOutput
from cluster.engine.errors import EngineDeadError, EngineOverloadedError, RankLostError
from cluster.engine.tokenizer import PreparedPrompt, Prompt

log = logging.getLogger(__name__)
_ids = itertools.count()
_DONE = object()


class _Stream:
    """Where one request's outputs land; readable from a thread (get) or an event loop (aget)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, sink: queue.Queue | None = None):
        self.loop = loop
        self.q: queue.Queue | None = None if loop else (sink if sink is not None else queue.Queue())
        self.aq: asyncio.Queue | None = asyncio.Queue() if loop else None

    def put(self, item) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.aq.put_nowait, item)
        else:
            self.q.put(item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = 4096):
        """engine: the engine, or what builds it (from_model). A builder runs on the step loop's thread, and returns
        here once the engine is up (or raises what the build raised).

        Why build there: on the CPU, torch's OpenMP (libgomp) keeps a pool of workers per thread that runs parallel
        ops. An engine built (weights, warm-up) on one thread and stepped on another leaves two pools, more OpenMP
        threads than cores, and libgomp then stops spinning between parallel regions. Each of a step's ~2,000
        small ops pays a futex wake-up: a SmolLM2 batch-1 step took 72 ms against 45 ms on 2 cores."""
        self.max_waiting = max_waiting
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        self._thread = threading.Thread(target=self._run, args=(build,), name="engine-loop", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    @classmethod
    def from_model(cls, model: str | None = None, engine_config: EngineConfig | None = None, *,
                   init_method: str | None = None, max_waiting: int = 4096) -> "AsyncEngine":
        """See LLMEngine(model, engine_config, init_method=...); built on the step loop's thread."""
        return cls(lambda: LLMEngine(model, engine_config, init_method=init_method), max_waiting=max_waiting)

    # -- facts -----------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def session_len(self) -> int:
        return self.engine.session_len

    @property
    def model_name(self) -> str:
        from pathlib import Path

        src = self.engine.model_config.source
        return Path(src).stem if src else "default"

    def prepare_prompt(self, prompt: Prompt) -> PreparedPrompt:
        """See LLMEngine.prepare_prompt: runs on the caller's thread."""
        return self.engine.prepare_prompt(prompt)

    def validate(self, prompt: PreparedPrompt, gen_config: GenerationConfig) -> None:
        """See LLMEngine.validate."""
        self.engine.validate(prompt, gen_config)

    def stats(self) -> dict:
        s = self.engine.stats_dict()
        s["num_waiting"] += self._inbox.qsize()
        return s

    def check_health(self) -> None:
        """Raise if the step loop is gone. Clients see the message (/health), so it names the exception's class at
        most: the traceback was logged when the loop died, and `_error` keeps it for operators."""
        if isinstance(self._error, RankLostError):  # its message is written for clients
            raise EngineDeadError(f"engine step loop died: {self._error}")
        if self._error is not None:
            raise EngineDeadError(f"engine step loop died ({type(self._error).__name__}); see the server log")
        if not self._thread.is_alive():
            raise EngineDeadError("engine step loop is not running")

    # -- requests --------------------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt | PreparedPrompt, gen_config: GenerationConfig | None, request_id: str | None,
               loop: asyncio.AbstractEventLoop | None, sink: queue.Queue | None = None) -> tuple[str, _Stream]:
        """Queue a request for the loop; its outputs go to an asyncio queue (loop given) or a thread queue.

        A raw prompt is prepared and validated here, on the caller's thread. A PreparedPrompt is neither: its
        caller ran prepare_prompt and validate(prepared, gen) with this gen (RankZeroHost does, off its loop)."""
        self.check_health()
        waiting = self.stats()["num_waiting"]
        if waiting >= self.max_waiting:
            raise EngineOverloadedError(waiting, self.max_waiting)
        gen = gen_config or GenerationConfig()
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.engine.prepare_prompt(prompt)
            self.engine.validate(prompt, gen)
        rid = request_id or f"req-{next(_ids)}"
        stream = _Stream(loop, sink)
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = stream
        self._inbox.put(("add", rid, prompt, gen))
        self._wake.set()
        return rid, stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None, None))
        self._wake.set()

    async def generate(self, prompt: Prompt, gen_config: GenerationConfig | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid, stream = self.submit(prompt, gen_config, request_id, asyncio.get_running_loop())
        finished = False
        try:
            while True:
                item = await stream.aq.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def stream(self, prompt: Prompt, gen_config: GenerationConfig | None = None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Blocking iterator of outputs; closing it early (or Ctrl-C) aborts the request."""
        rid, stream = self.submit(prompt, gen_config, request_id, None)
        finished = False
        try:
            while True:
                item = stream.q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.runner.close()  # tensor-parallel ranks in other processes

    # -- the loop --------------------------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                op, rid, prompt, gen = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    self.engine.add_request(prompt, gen, rid)  # prepared and validated in submit
                except Exception as e:  # noqa: BLE001 - handed to the caller's stream
                    self._close(rid, e)
            elif op == "abort":
                if self.engine.abort(rid):
                    self._close(rid, None, abort=True)
                else:
                    with self._lock:
                        self._streams.pop(rid, None)

    def _close(self, rid: str, error: BaseException | None, abort: bool = False) -> None:
        with self._lock:
            stream = self._streams.pop(rid, None)
        if stream is None:
            return
        if error is not None:
            stream.put(error)
        elif abort:
            stream.put(RequestOutput(finish_reason="abort", request_id=rid))

    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # noqa: BLE001 - the constructor re-raises it on its own thread
            self._build_error = e
            return
        finally:
            self._built.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - fails only the requests to blame, if any
                    blamed = self.engine.recover(e)
                    if not blamed:
                        raise
                    for rid, error in blamed:
                        self._close(rid, error)
                    continue
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            log.error("engine loop died: %s", traceback.format_exc())
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            # not the exception's text, which may come from another user's request; a lost rank's is written for them
            why = f": {e}" if isinstance(e, RankLostError) else ""
            for s in streams:
                s.put(RankLostError(f"engine step loop failed{why}; the request was not completed, retry it")
                      if why else EngineDeadError("engine step loop failed; the request was not completed, retry it"))
            self._error = e  # after the streams' errors: a health check that sees it finds them already sent

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finish_reason is not None:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            stream.put(out.error if out.error is not None else out)
