"""Replica failures and hostile inputs, fast: ReplicaCore, RankZeroHost and RankWorker in this process over a fake
engine and fake rank-0 clients (no Ray, no model). Every request ends, answered or with an error, in bounded time;
a slow prompt never stalls rank 0's loop; a remote caller never makes the server open one of its files; and no
client reads text that was not written for it (a library's, or the engine's death)."""
from __future__ import annotations

import asyncio
import base64
import inspect
import io
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from cluster.deployments.replica import Connection, LocalWorkerClient, ReplicaCore
from cluster.engine import multimodal
from cluster.engine.errors import EngineDeadError
from cluster.messages import Choice, Deltas, EngineRequest, Failed, Job, PollReply, Started
from cluster.workers.client_errors import BAD_PROMPT
from cluster.workers.host import RankZeroHost
from cluster.workers.worker import RankWorker
from test_router_protocol import Out  # the fields RankZeroHost.poll reads from an engine output

pytestmark = pytest.mark.anyio
SECRET = "secret-death-text 0xdead"  # in the engine's death: operators may read it, clients may not
BOUND_S = 5.0  # every request must end within this


@pytest.fixture
def anyio_backend():
    return "asyncio"


# -- a fake engine ----------------------------------------------------------------------------------------------------
class FakeTokenizer:
    max_token_chars = 8

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" t{i}" for i in ids)


class FakeEngine:
    """AsyncEngine's interface: token k (' tk') per step per request on a thread of its own. `on_prepare[prompt]`
    runs while that prompt is prepared (to make it slow, or fail); a message list has its images decoded, as the
    real engine does; `death` set: the step loop dies, saying so."""

    model_name = "fake-model"

    def __init__(self, step_s: float = 0.005, session_len: int = 10_000):
        self.tokenizer = FakeTokenizer()
        self.session_len = session_len
        self.step_s = step_s
        self.on_prepare: dict[str, Callable[[], None]] = {}
        self.reqs: dict[str, list] = {}
        self.lock = threading.Lock()
        self.death: str | None = None
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def prepare_prompt(self, prompt):
        if isinstance(prompt, str):
            self.on_prepare.get(prompt, lambda: None)()
            return [len(w) for w in prompt.split()]
        if prompt and isinstance(prompt[0], dict):
            multimodal.prompt_images(prompt)
            return [1, 2, 3]
        return list(prompt)

    def validate(self, ids, gen):
        pass

    def submit(self, ids, gen, rid, loop, sink):
        self.check_health()
        with self.lock:
            self.reqs[rid] = [ids, gen, sink, 0]
        return rid, sink

    def abort(self, rid):
        with self.lock:
            r = self.reqs.pop(rid, None)
        if r is not None:
            r[2].put(Out(rid, "", [], None, "abort", len(r[0]), r[3]))

    def _loop(self):
        while not self.stop:
            time.sleep(self.step_s)
            if self.stop:
                return
            with self.lock:
                reqs = list(self.reqs.items())
                if self.death:
                    self.reqs = {}
            for rid, r in reqs:
                if self.death:
                    r[2].put(EngineDeadError(f"engine failed: {self.death}"))
                    continue
                r[3] += 1
                done = r[3] >= r[1].max_new_tokens
                if done:
                    with self.lock:
                        self.reqs.pop(rid, None)
                r[2].put(Out(rid, f" t{r[3]}", [r[3]], None, "length" if done else None, len(r[0]), r[3]))

    def stats(self):
        return {"num_running": len(self.reqs), "num_waiting": 0, "kv_usage": 0.0}

    def check_health(self):
        if self.death:
            raise EngineDeadError(f"engine step loop died: {self.death}")

    def shutdown(self):
        """Stopped and joined: no output reaches a host whose loop is gone."""
        self.stop = True
        self.thread.join()


# -- helpers ----------------------------------------------------------------------------------------------------------
def job(request_id: str, prompt="a b", max_new_tokens: int = 4) -> Job:
    return Job(request_id, [Choice(0, prompt, {"max_new_tokens": max_new_tokens})], param="prompt")


def item(rid: str, prompt, max_new_tokens: int = 4, param: str | None = "prompt") -> EngineRequest:
    return EngineRequest(rid, prompt, {"max_new_tokens": max_new_tokens}, param=param)


KIND = {Started: "start", Deltas: "delta", Failed: "error"}


async def core_over(engine: FakeEngine, client_type=LocalWorkerClient, **kw) -> ReplicaCore:
    """A started ReplicaCore whose rank 0 is `engine` behind a RankZeroHost in this loop, reached by `client_type`."""
    host = RankZeroHost(engine, asyncio.get_running_loop())
    client = client_type(host)

    async def connect():
        return Connection(client, host.info(), lambda: None)

    core = ReplicaCore(connect, restart=False, poll_timeout=0.1, **kw)
    await core.start()
    return core


async def events_of(stream, until: str | None = None) -> list[dict]:
    """The stream's events, to its end or through the first of type `until`."""
    out = []
    async for ev in stream:
        out.append(ev)
        if KIND[type(ev)] == until:
            break
    return out


async def started(core: ReplicaCore, request_id: str):
    """A running request: its stream, past `start` and a first delta."""
    stream = core.generate(job(request_id, max_new_tokens=5000))
    assert [KIND[type(ev)] for ev in await asyncio.wait_for(events_of(stream, "delta"), BOUND_S)] == ["start", "delta"]
    return stream


async def ends_in_error(stream) -> dict:
    """The stream's last event, which must be an error, and must come within BOUND_S."""
    evs = await asyncio.wait_for(events_of(stream), BOUND_S)
    assert evs and isinstance(evs[-1], Failed), evs
    return evs[-1].error


async def maybe_await(x):
    """The old RankWorker.add_requests was sync: take either, so the tests fail on what it did, not how."""
    return await x if inspect.isawaitable(x) else x


# -- 1. every request ends --------------------------------------------------------------------------------------------
class BreaksMidAdd(LocalWorkerClient):
    """Rank 0 that breaks while an add is in flight: once `stall` is set, add_requests never answers, and the next
    poll (held until `release`) reports the engine dead, or raises as a dead actor's call does."""

    def __init__(self, host, mode: str = "dead"):
        super().__init__(host)
        self.mode, self.stall = mode, False
        self.add_in_flight, self.release = asyncio.Event(), asyncio.Event()

    async def add_requests(self, items):
        if not self.stall:
            return await super().add_requests(items)
        self.add_in_flight.set()
        await asyncio.Event().wait()

    async def poll(self, timeout):
        if not self.stall:
            return await super().poll(timeout)
        await self.add_in_flight.wait()
        await self.release.wait()
        if self.mode == "raise":
            raise ConnectionError(f"the actor died: {SECRET}")
        return PollReply(dead=f"engine step loop died: {SECRET}")


@pytest.mark.parametrize("mode", ["dead", "raise"])
async def test_engine_failing_while_an_add_is_in_flight_ends_every_request(mode):
    engine = FakeEngine(step_s=0.02)
    core = await core_over(engine, lambda host: BreaksMidAdd(host, mode))
    client = core.conn.client
    running = await started(core, "early")
    client.stall = True
    in_flight = asyncio.create_task(ends_in_error(core.generate(job("in-flight"))))
    await asyncio.wait_for(client.add_in_flight.wait(), BOUND_S)
    queued = [asyncio.create_task(ends_in_error(core.generate(job(f"queued-{i}")))) for i in range(2)]
    await asyncio.sleep(0.05)  # they queue behind the add in flight
    client.release.set()
    errors = [await ends_in_error(running)] + list(await asyncio.gather(in_flight, *queued))
    assert [e.kind for e in errors] == ["engine_dead"] * 4
    assert all(e.retry_after and SECRET not in e.message for e in errors), errors
    assert SECRET in core.last_error and core.state == "dead"
    assert core.pending_work == 0 and not core.streams
    engine.shutdown()


class NeverAnswersAdds(LocalWorkerClient):
    async def add_requests(self, items):
        await asyncio.Event().wait()


async def test_an_add_that_is_never_answered_ends_in_bounded_time():
    engine = FakeEngine()
    core = await core_over(engine, NeverAnswersAdds, call_timeout_s=0.5)
    t0 = time.monotonic()
    err = await ends_in_error(core.generate(job("r")))
    assert time.monotonic() - t0 < 2.0
    assert err.kind in ("unavailable", "engine_dead") and err.retry_after, err
    assert not core.streams
    engine.shutdown()


async def test_a_cancelled_replica_loop_ends_even_if_a_wait_swallows_the_cancel():
    """Python 3.11's asyncio.wait_for returns the inner result when a cancel lands as the inner call completes:
    the replica's loops must end anyway (a loop that polls on forever hangs the event loop's shutdown)."""
    engine = FakeEngine()
    host = RankZeroHost(engine, asyncio.get_running_loop())

    async def connect():
        return Connection(LocalWorkerClient(host), host.info(), lambda: None)

    async def swallowing(call, what, wait=0.0):
        try:
            return await call
        except asyncio.CancelledError:
            return PollReply()

    core = ReplicaCore(connect, restart=False, poll_timeout=0.05)
    core._answer = swallowing
    await core.start()
    await asyncio.sleep(0.1)
    for task in core._tasks:
        task.cancel()
    done, pending = await asyncio.wait(core._tasks, timeout=BOUND_S)
    core.generation += 1  # should the test fail: the loops end anyway, so the event loop can close
    assert not pending, "a loop kept polling after it was cancelled"
    engine.shutdown()


class PollsStopAnswering(LocalWorkerClient):
    hang = False

    async def poll(self, timeout):
        if self.hang:
            await asyncio.Event().wait()
        return await super().poll(timeout)


async def test_a_stream_whose_rank0_stops_answering_polls_gets_its_error():
    engine = FakeEngine(step_s=0.02)
    core = await core_over(engine, PollsStopAnswering, call_timeout_s=0.5)
    stream = await started(core, "r")
    core.conn.client.hang = True
    err = await ends_in_error(stream)
    assert err.kind == "engine_dead" and "did not answer a poll" in core.last_error
    engine.shutdown()


async def test_close_ends_running_streams_and_unanswered_adds():
    engine = FakeEngine(step_s=0.02)
    core = await core_over(engine, BreaksMidAdd)
    stream = await started(core, "running")
    core.conn.client.stall = True  # adds never answered; polls held (never released)
    pending = asyncio.create_task(ends_in_error(core.generate(job("pending"))))
    await asyncio.sleep(0.05)
    await core.close()
    errors = [await ends_in_error(stream), await pending]
    assert [e.kind for e in errors] == ["unavailable", "unavailable"]
    engine.shutdown()


# -- 2. a slow prompt stalls nothing -----------------------------------------------------------------------------------
async def rank_worker(engine: FakeEngine) -> RankWorker:
    """Rank 0's actor class, without Ray, over `engine`."""
    worker = RankWorker(0, 1, None, {})
    worker.host = RankZeroHost(engine, asyncio.get_running_loop())
    worker.state = "ready"
    return worker


async def test_a_slow_prompt_does_not_stall_other_streams():
    engine = FakeEngine(step_s=0.005)
    engine.on_prepare["slow"] = lambda: time.sleep(1.0)
    worker = await rank_worker(engine)
    assert (await maybe_await(worker.add_requests([item("fast", [1, 2], max_new_tokens=5000)])))[0].ok
    seen: list[float] = []
    polling = True

    async def poller():
        while polling:
            if "fast" in (await worker.poll(0.2)).outputs:
                seen.append(time.monotonic())

    task = asyncio.create_task(poller())
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    res = await maybe_await(worker.add_requests([item("slow", "slow")]))
    t1 = time.monotonic()
    polling = False
    await task
    assert res[0].ok and t1 - t0 >= 0.9
    stamps = [t0] + [t for t in seen if t0 <= t <= t1] + [t1]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.5, "poll replies stalled while a prompt was prepared"
    worker.abort(["fast", "slow"])
    engine.shutdown()


async def test_an_abort_during_preparation_leaves_nothing_running():
    engine = FakeEngine()
    engine.on_prepare["slow"] = lambda: time.sleep(0.5)
    worker = await rank_worker(engine)
    adding = asyncio.create_task(maybe_await(worker.add_requests([item("slow", "slow")])))
    await asyncio.sleep(0.1)
    assert not adding.done(), "the add ran on the event loop"
    worker.abort(["slow"])
    res = await asyncio.wait_for(adding, BOUND_S)
    assert not res[0].ok
    await asyncio.sleep(0.05)
    assert not engine.reqs
    assert (await worker.add_requests([item("slow", [1, 2])]))[0].ok  # the id is usable again
    assert "slow" in engine.reqs
    engine.shutdown()


# -- 3. remote callers send images inline ----------------------------------------------------------------------------
def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    return buf.getvalue()


def image_messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is this?"}]}]


async def test_image_paths_are_refused_alike_and_never_opened(tmp_path, monkeypatch):
    png = tmp_path / "x.png"
    png.write_bytes(png_bytes())
    opened: list = []
    real_load = multimodal.load_image

    def load_image(obj):
        if not (isinstance(obj, str) and obj.startswith("data:")):
            opened.append(obj)
        return real_load(obj)

    def read_bytes(self):
        opened.append(self)
        raise AssertionError("a server file was read")

    monkeypatch.setattr(multimodal, "load_image", load_image)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    engine = FakeEngine()
    host = RankZeroHost(engine, asyncio.get_running_loop())
    urls = [str(png), str(tmp_path / "missing.png"), f"{tmp_path}/../{tmp_path.name}/x.png", "../../etc/passwd",
            "~/x.png", f"file://{png}"]
    for path in ("sync", "async"):
        items = [item(f"{path}-{i}", image_messages(u), param=None) for i, u in enumerate(urls)]
        results = host.add_requests(items) if path == "sync" else await host.add_requests_async(items)
        errors = [r.error for r in results if not r.ok]
        assert len(errors) == len(urls), results
        assert {(e.kind, e.param, e.message) for e in errors} == {("bad_request", "messages",
                                                                             multimodal.INLINE_ONLY)}
        assert opened == []
    inline = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert host.add_requests([item("ok", image_messages(inline))])[0].ok  # the way that works
    engine.shutdown()


# -- 4. clients read only text written for them ------------------------------------------------------------------------
LIBRARY_TEXT = "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"


def a_library_refuses():
    raise ValueError(LIBRARY_TEXT)  # this module is not the cluster package: as a library's error


def our_code_calls_a_c_extension():
    """Code of the cluster package whose error comes from C (its innermost frame is the call, not a raise)."""
    scope = {"__name__": "cluster.fake_tokenizer"}
    exec(compile("def encode(text):\n    return int(text)\n", "cluster/fake_tokenizer.py", "exec"), scope)
    scope["encode"]("Overflow when unpacking long long")


def our_code_refuses():
    multimodal.split_content(42, "")  # raises our own ValueError, written for users


def a_bug():
    raise RuntimeError(f"internal state {SECRET}")


async def test_library_text_never_reaches_clients_ours_does(caplog):
    engine = FakeEngine()
    for name, fn in [("lib", a_library_refuses), ("ext", our_code_calls_a_c_extension), ("ours", our_code_refuses),
                     ("bug", a_bug)]:
        engine.on_prepare[name] = fn
    host = RankZeroHost(engine, asyncio.get_running_loop())
    with caplog.at_level(logging.WARNING, logger="cluster.workers.client_errors"):
        lib, ext, ours, bug = [r.error for r in host.add_requests(
            [item(f"{p}-0", p) for p in ("lib", "ext", "ours", "bug")])]
    assert (lib.kind, lib.param, lib.message) == ("bad_request", "prompt", BAD_PROMPT)
    assert (ext.kind, ext.message) == ("bad_request", BAD_PROMPT)
    assert (ours.kind, ours.param) == ("bad_request", "prompt")
    assert ours.message == "message content must be a string or a list of content parts"
    assert (bug.kind, bug.message) == ("internal", "internal error")
    assert LIBRARY_TEXT in caplog.text and SECRET in caplog.text and "bug-0" in caplog.text  # for operators
    engine.shutdown()


async def test_the_engines_death_is_not_told_to_clients():
    engine = FakeEngine(step_s=0.02)
    core = await core_over(engine)
    streams = [await started(core, f"r{i}") for i in range(3)]
    engine.death = f"CUDA error: {SECRET}"
    errors = [await ends_in_error(s) for s in streams]
    errors.append(await ends_in_error(core.generate(job("after"))))  # the replica is dead now: says only that
    assert [e.kind for e in errors] == ["engine_dead"] * 3 + ["unavailable"]
    assert all(SECRET not in e.message and e.retry_after for e in errors), errors
    assert SECRET in core.last_error
    engine.shutdown()
