"""Tensor parallelism: one model replica over N ranks (one process per GPU, or per CPU share), each rank holding
1/N of the weights (its converted shard, rank{r}.safetensors) and 1/N of the paged KV cache (its KV heads).

Rank 0 runs the engine (scheduler, sampler, detokenizer); each step it sends the step's plan (a StepInput) to the
other ranks with two torch.distributed broadcasts on a CPU (gloo) group -- a fixed-size int64 header, then one
int64 tensor with every index tensor packed (tp_wire.py) -- so no step costs a Ray call. Every rank runs the same forward
pass; the model's row-parallel all-reduces and the LM head's all-gather run on the replica's default process group
(NCCL on GPUs, gloo on CPUs; tp_groups.py). Logits come back on rank 0 only.

Contract for the Ray path (cluster/workers/worker.py, group.py: one actor per rank, STRICT_PACK placement group)
------------------------------------------------------------------------------------------------------------
Every rank gets the same model_dir (converted with --tp N; `ensure_converted(model, N, dtype)` is safe to call from
all of them: a file lock makes one convert and the others wait), engine_cfg (EngineConfig with tp == N), session_len
and init_method. Pick init_method on rank 0's node before starting any rank: `f"tcp://{ip}:{free_port()}"`.

  all:      model_dir, cfg, session_len = cluster.executor.resolve_model(model, engine_cfg)
  rank 0:   engine = LLMEngine(model, engine_cfg, init_method=init_method)  # create_executor -> from_initialized:
            #   TPExecutor.from_initialized(model_dir, cfg, engine_cfg, session_len, init_method=init_method)
  rank r>0: run_follower(model_dir, engine_cfg, session_len, rank=r, world_size=N, init_method=init_method)

All N calls must be in flight at the same time (they rendezvous through a TCPStore that rank 0 hosts at
init_method, then agree on the KV cache size). run_follower blocks until rank 0 closes the executor (it returns
normally) or the group breaks (it raises): run it on a thread of the actor, or as a method of a threaded actor
(max_concurrency >= 2), and keep its ObjectRef: when it fails or the actor dies, call `executor.abort(reason)` on
rank 0 (this also unblocks a rank 0 stuck in an NCCL collective), then tear the replica down. `executor.close()` on
rank 0 ends every follower's run_follower.

If the caller has already run `torch.distributed.init_process_group` itself (world = exactly the replica's N ranks,
this process's rank as above, backend nccl on GPUs / gloo on CPUs), pass init_method=None on every rank, and build
rank 0's executor with TPExecutor.from_initialized itself (create_executor takes no init_method as "spawn here").

Device: `device=None` picks cuda:(local_rank % visible GPUs) when CUDA is available and engine_cfg.device is not
'cpu' (local_rank defaults to rank; an actor that sees one GPU gets cuda:0), else the CPU.
Timeouts: a collective inside a step waits at most CLUSTER_TP_TIMEOUT seconds (default 300); idle followers wait
for the next step without limit; the rendezvous waits at most CLUSTER_TP_START_TIMEOUT seconds (default 300).

The plain (no Ray) case: `TPExecutor(model_dir, cfg, engine_cfg, session_len)`, which `LLMEngine(model,
EngineConfig(tp=N))` builds, spawns ranks 1..N-1 as local daemon processes (torch.multiprocessing, spawn) and
watches them: a dead follower makes the next step raise EngineDeadError naming the rank and its exit code. Only
one tensor-parallel group can live in a process (it owns the default torch.distributed group): close() the executor
before building another.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.errors import EngineDeadError, RankLostError
from cluster.engine.model_runner import ModelRunner, StepInput, load_shard
from cluster.engine.sequence import Sequence
from cluster.executor.tp_groups import (TPGroups, cpu_share, init_groups, intra_op_threads, rank_device,
                                        start_timeout, tp_scope)
from cluster.executor.tp_wire import CMD_SHUTDOWN, HEADER_LEN, embeds_message, pack_step, payload_len, unpack_step
from cluster.kernels import jit_cache
from cluster.models.config import ModelConfig

log = logging.getLogger(__name__)

def build_runner(model_dir: Path, cfg: ModelConfig, engine_cfg: EngineConfig, session_len: int,
                 groups: TPGroups) -> ModelRunner:
    """This rank's runner through the phases, in step with the other ranks: load the shard, profile, agree on the
    smallest block count over the ranks (every rank indexes its cache with rank 0's block tables), init_cache, and
    capture CUDA graphs (all ranks capture the same batch sizes in the same order). Collective."""
    cfg.check_tp(groups.size)
    jit_cache.use_beside(model_dir, groups.device)
    with tp_scope(groups):
        t = time.perf_counter()
        weights = load_shard(Path(model_dir), groups.rank, groups.device)
        loaded = time.perf_counter() - t
        runner = ModelRunner(cfg, weights, engine_cfg, groups.device, session_len, groups.rank, groups.size)
        runner.phases.seconds["load"] = loaded
        del weights
        fits = runner.phases.run("profile", runner.profile)
        n = torch.tensor([fits], dtype=torch.long)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=groups.cpu_group)
        agreed = int(n.item())
        if agreed != fits:
            log.info("rank %d: KV cache %d -> %d blocks (the smallest over the ranks)", groups.rank, fits, agreed)
        runner.phases.run("cache", runner.init_cache, agreed)
        runner.capture()
    return runner


# -- ranks 1..N-1 -----------------------------------------------------------------------------------------------------
def follower_loop(runner: ModelRunner, groups: TPGroups) -> int:
    """Receive a plan, run it, repeat, until rank 0 sends shutdown. Returns the number of steps run."""
    header = torch.empty(HEADER_LEN, dtype=torch.long)
    steps = 0
    with tp_scope(groups):
        while True:
            dist.broadcast(header, 0, group=groups.cpu_group)
            if int(header[0]) == CMD_SHUTDOWN:
                return steps
            payload = torch.empty(payload_len(header), dtype=torch.long)
            dist.broadcast(payload, 0, group=groups.cpu_group)
            embeds = None
            if int(header[7]):
                embeds = torch.empty(int(header[7]), runner.cfg.hidden_size, dtype=torch.float32)
                dist.broadcast(embeds, 0, group=groups.cpu_group)
            runner.execute(unpack_step(header, payload, embeds))  # logits are rank 0's business
            steps += 1


def run_follower(model_dir: str | Path, engine_cfg: EngineConfig, session_len: int, rank: int, world_size: int,
                 init_method: str | None, device: torch.device | str | None = None,
                 local_rank: int | None = None) -> int:
    """Tensor-parallel rank `rank` > 0 of a replica: join the group, load the shard, serve steps until shutdown.
    Blocks; returns the number of steps run after a clean shutdown, raises if the group breaks."""
    if rank <= 0 or rank >= world_size:
        raise ValueError(f"run_follower is for ranks 1..{world_size - 1}, got {rank}")
    dev = torch.device(device) if device is not None else rank_device(engine_cfg, rank if local_rank is None else local_rank)
    groups = init_groups(rank, world_size, dev, init_method)
    try:
        cfg = ModelConfig.load(Path(model_dir) / "config.json")
        runner = build_runner(Path(model_dir), cfg, engine_cfg, session_len, groups)
        return follower_loop(runner, groups)
    finally:
        if groups.owned:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _follower_process(rank: int, world_size: int, init_method: str, model_dir: str, engine_cfg: EngineConfig,
                      session_len: int, errors, parent_pid: int) -> None:
    """Entry point of a spawned local follower (the plain, no-Ray case)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it shuts us down
    if (engine_cfg.device or "").startswith("cpu") or not torch.cuda.is_available():
        torch.set_num_threads(cpu_share(world_size))

    def orphan_watch() -> None:  # rank 0 vanished without a word: nothing left to serve
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True, name="orphan-watch").start()
    try:
        run_follower(model_dir, engine_cfg, session_len, rank, world_size, init_method)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it to the engine's callers
        msg = f"{type(e).__name__}: {e}"
        log.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        with contextlib.suppress(Exception):
            errors.put((rank, msg))
        os._exit(1)


# -- rank 0 -----------------------------------------------------------------------------------------------------------
class TPExecutor:
    """Rank 0 of a tensor-parallel replica, an Executor (cluster.executor) for the engine: prepare(plan, bm) ->
    StepInput, execute(step) -> logits [N, vocab] fp32, broadcasting each step to the followers. `runner` is rank
    0's own ModelRunner (its slice of the model and of the KV cache)."""

    can_overlap = False  # the followers take each step's input ids from the host

    def __init__(self, model_dir: str | Path, cfg: ModelConfig, engine_cfg: EngineConfig, session_len: int, *,
                 _groups: TPGroups | None = None):
        self.cfg, self.engine_cfg, self.session_len = cfg, engine_cfg, session_len
        self.tp_size = engine_cfg.tp
        self.tp_rank = 0
        self._procs: list = []  # local followers (the plain case)
        self._errors = None  # where they report a failure: (rank, message)
        self._dead: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._cpu_threads = None  # set in the plain CPU case: each local rank gets its share of the cores
        if _groups is None:  # the plain case: spawn the followers here
            cfg.check_tp(self.tp_size)
            _groups = self._spawn_and_join(Path(model_dir), engine_cfg, session_len)
        self.groups = _groups
        if self._procs and self.groups.device.type == "cpu":
            self._cpu_threads = cpu_share(self.tp_size)
        try:
            with intra_op_threads(self._cpu_threads):
                self.runner = build_runner(Path(model_dir), cfg, engine_cfg, session_len, self.groups)
        except BaseException as e:
            err = self._follower_failure(wait=1.0)
            self.close(graceful=False)  # followers may be inside a start-up collective: no shutdown message
            if err:
                raise EngineDeadError(f"tensor-parallel start failed: {err}") from e
            raise
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.num_blocks, self.block_size = self.runner.num_blocks, self.runner.block_size
        self.max_batch_size = self.runner.max_batch_size
        self._ref = weakref.ref(self)
        atexit.register(_close_at_exit, self._ref)
        if self._procs and self.groups.backend == "nccl":
            threading.Thread(target=self._watch, daemon=True, name="tp-watchdog").start()

    @classmethod
    def from_initialized(cls, model_dir: str | Path, cfg: ModelConfig, engine_cfg: EngineConfig, session_len: int,
                         init_method: str | None = None, device: torch.device | str | None = None,
                         local_rank: int = 0) -> "TPExecutor":
        """Rank 0 whose followers run run_follower elsewhere (Ray actors): joins through init_method, or reuses the
        caller's torch.distributed group when init_method is None. See the module docstring."""
        cfg.check_tp(engine_cfg.tp)
        dev = torch.device(device) if device is not None else rank_device(engine_cfg, local_rank)
        groups = init_groups(0, engine_cfg.tp, dev, init_method)
        return cls(model_dir, cfg, engine_cfg, session_len, _groups=groups)

    def _spawn_and_join(self, model_dir: Path, ec: EngineConfig, session_len: int) -> TPGroups:
        import torch.multiprocessing as mp

        device = rank_device(ec, 0)
        if device.type == "cuda" and torch.cuda.device_count() < self.tp_size:
            raise ValueError(f"tp={self.tp_size} needs {self.tp_size} GPUs, {torch.cuda.device_count()} visible "
                             "(CUDA_VISIBLE_DEVICES picks which)")
        store = dist.TCPStore("127.0.0.1", 0, self.tp_size, True, start_timeout(), wait_for_workers=False)
        init_method = f"tcp://127.0.0.1:{store.port}"
        ctx = mp.get_context("spawn")
        self._errors = ctx.SimpleQueue()
        with _main_not_reimported():
            for r in range(1, self.tp_size):
                p = ctx.Process(target=_follower_process, name=f"tp-rank{r}", daemon=True,
                                args=(r, self.tp_size, init_method, str(model_dir), ec, session_len, self._errors,
                                      os.getpid()))
                p.start()
                self._procs.append(p)
        try:
            return init_groups(0, self.tp_size, device, None, store=store, alive=self._raise_if_follower_died)
        except BaseException as e:
            err = self._follower_failure()
            self._stop_procs(graceful=False)
            if dist.is_initialized():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            if err:
                raise EngineDeadError(f"tensor-parallel start failed: {err}") from e
            raise

    # -- health ----------------------------------------------------------------------------------------------------
    @property
    def follower_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _follower_failure(self, wait: float = 0.0) -> str | None:
        """What went wrong with a local follower, if one has died: its own error message, else its exit code."""
        deadline = time.monotonic() + wait
        while True:
            dead = [(r, p) for r, p in enumerate(self._procs, start=1) if not p.is_alive()]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if not dead:
            return None
        reported = {}
        with contextlib.suppress(Exception):
            while self._errors is not None and not self._errors.empty():
                r, msg = self._errors.get()
                reported[r] = msg
        r, p = dead[0]
        if r in reported:
            return f"tensor-parallel rank {r} failed: {reported[r]}"
        code = p.exitcode
        how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"tensor-parallel rank {r} (pid {p.pid}) died ({how})"

    def _raise_if_follower_died(self) -> None:
        err = self._follower_failure()
        if err:
            raise RankLostError(err)

    def _watch(self) -> None:
        """NCCL does not notice a dead peer: abort the communicator so a rank 0 blocked in a collective wakes up."""
        while not self._closed and self._dead is None:
            err = self._follower_failure()
            if err:
                self.abort(err)
                return
            time.sleep(0.5)

    def abort(self, reason: str) -> None:
        """Mark the replica dead (every later step raises EngineDeadError with `reason`) and break its NCCL
        collectives. Safe from any thread; the Ray worker calls it when a follower actor fails."""
        if self._dead is None:
            self._dead = reason
            log.error("tensor-parallel replica is dead: %s", reason)
        if self.groups.backend == "nccl":
            with contextlib.suppress(Exception):
                self.groups.model_group._get_backend(self.device).abort()

    def _fail(self, e: BaseException) -> EngineDeadError:
        reason = self._dead or self._follower_failure(wait=2.0)
        if reason is None:  # rank 0's own step failed: its text may be a request's, so only the log has it
            log.error("tensor-parallel step failed on rank 0: %r", e)
            reason = f"tensor-parallel step failed on rank 0 ({type(e).__name__})"
        self.abort(reason)
        return RankLostError(reason)

    # -- the Executor interface ---------------------------------------------------------------------------------------
    def prepare(self, plan: list[tuple[Sequence, int]], bm: BlockManager) -> StepInput:
        return self.runner.prepare(plan, bm, to_device=False)  # broadcast from the host, moved in execute

    def execute(self, step: StepInput, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:
            raise ValueError("tensor parallelism runs no step ahead: the followers read input ids from the plan")
        if self._dead is not None:
            raise RankLostError(self._dead)
        if self._closed:
            raise EngineDeadError("tensor-parallel executor is closed")
        err = self._follower_failure()
        if err:
            raise self._fail(RuntimeError(err))
        header, payload = pack_step(step)
        embeds = embeds_message(step)
        try:
            with self._lock, tp_scope(self.groups), intra_op_threads(self._cpu_threads):
                dist.broadcast(header, 0, group=self.groups.cpu_group)
                dist.broadcast(payload, 0, group=self.groups.cpu_group)
                if embeds is not None:
                    dist.broadcast(embeds, 0, group=self.groups.cpu_group)
                logits = self.runner.execute(step)
                if self.groups.backend == "nccl":
                    # wait here, not in the sampler: if a peer died, abort() has broken the collective and these
                    # logits are garbage -- the step must fail rather than hand out a token
                    torch.cuda.current_stream(self.device).synchronize()
                    if self._dead is not None:
                        raise RankLostError(self._dead)
                return logits
        except Exception as e:  # a step that failed part-way leaves the ranks out of step: the replica is done
            raise self._fail(e) from e

    # -- shutdown ----------------------------------------------------------------------------------------------------
    def close(self, graceful: bool = True) -> None:
        """Stop the followers (a shutdown message, then a kill for any that linger) and free the process group."""
        if self._closed:
            return
        self._closed = True
        graceful = graceful and self._dead is None and getattr(self, "groups", None) is not None
        if graceful and self._lock.acquire(timeout=10):  # not while a step hangs
            try:
                header = torch.zeros(HEADER_LEN, dtype=torch.long)
                header[0] = CMD_SHUTDOWN
                dist.broadcast(header, 0, group=self.groups.cpu_group)
            except Exception:  # noqa: BLE001 - a broken group: the followers get killed below
                graceful = False
            finally:
                self._lock.release()
        self._stop_procs(graceful)
        if getattr(self, "groups", None) is not None and self.groups.owned:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.runner = None

    def _stop_procs(self, graceful: bool = True) -> None:
        if graceful:
            for p in self._procs:
                p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@contextlib.contextmanager
def _main_not_reimported():
    """A spawned child normally re-imports the parent's __main__ (so an unguarded script would start over in every
    follower); the followers need nothing from it, so hide it while they start: `pipeline(..., tp=2)` then works
    from any script, notebook or `python -c` without an `if __name__ == "__main__":` guard."""
    import sys

    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _close_at_exit(ref: weakref.ref) -> None:
    ex = ref()
    if ex is not None:
        ex.close()
