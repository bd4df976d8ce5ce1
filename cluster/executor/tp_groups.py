"""The process groups of a tensor-parallel replica: the rendezvous on rank 0's TCPStore, the model's group (NCCL on
GPUs, gloo on CPUs) and a gloo CPU group for step plans; which device a rank uses, how long collectives may wait,
and how many CPU threads each rank gets when all share one host."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from cluster.config import EngineConfig
from cluster.layers import parallel

IDLE_TIMEOUT = timedelta(days=36500)  # a follower waits for rank 0's next step as long as the engine idles


def step_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("CLUSTER_TP_TIMEOUT", 300)))


def start_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("CLUSTER_TP_START_TIMEOUT", 300)))


def free_port(host: str = "") -> int:
    """A TCP port free right now on this node (for init_method; the caller binds it soon after)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_device(engine_cfg: EngineConfig, local_rank: int) -> torch.device:
    want = (engine_cfg.device or "").split(":")[0]
    if want == "cpu" or (not want and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


@dataclass
class TPGroups:
    rank: int
    size: int
    device: torch.device
    backend: str  # of the model's collectives: nccl on GPUs, gloo on CPUs
    model_group: object  # the default group: all-reduces / all-gathers inside the model
    cpu_group: object  # gloo: step plans, the KV-size agreement, shutdown
    owned: bool  # this module initialized torch.distributed (so close() destroys it)


def _join_store(init_method: str, rank: int, world_size: int, store=None, alive=None) -> dist.Store:
    """Rendezvous: every rank checks in on rank 0's TCPStore; rank 0 waits for all of them, calling alive() so a
    follower that dies before checking in fails the start at once instead of after the timeout."""
    timeout = start_timeout()
    if store is None:
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.port:
            raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
        store = dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout, wait_for_workers=False)
    store.add("cluster_tp/joined", 1)
    if rank == 0:
        deadline = time.monotonic() + timeout.total_seconds()
        while store.add("cluster_tp/joined", 0) < world_size:
            if alive is not None:
                alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel start: only {store.add('cluster_tp/joined', 0)} of {world_size} "
                                   f"ranks joined in {timeout.total_seconds():.0f} s")
            time.sleep(0.05)
    return store


def init_groups(rank: int, world_size: int, device: torch.device, init_method: str | None,
                store=None, alive=None) -> TPGroups:
    """Join (or reuse, when init_method and store are None) the replica's process group and add the gloo CPU group.
    Collective: every rank of the replica calls it at the same time."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = init_method is not None or store is not None
    if owned:
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: another tensor-parallel "
                               "engine is still open (close it first), or pass init_method=None to reuse the group")
        store = _join_store(init_method, rank, world_size, store, alive)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=step_timeout(),
                                device_id=device if backend == "nccl" else None)
    else:
        if not dist.is_initialized():
            raise RuntimeError("init_method=None needs torch.distributed initialized by the caller")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"the initialized process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"this tensor-parallel rank is {rank} of {world_size}")
    # rank 0 sends plans (a collective there waits at most the step timeout); followers wait for them while idle
    cpu_group = dist.new_group(backend="gloo", timeout=step_timeout() if rank == 0 else IDLE_TIMEOUT)
    return TPGroups(rank, world_size, device, backend, dist.group.WORLD, cpu_group, owned)


def cpu_share(world_size: int) -> int:
    """Intra-op threads per rank when all ranks share this host's CPUs (more only oversubscribes the cores)."""
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
               // world_size)


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    if not n:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def tp_scope(groups: TPGroups):
    """Make the model's parallel layers use this replica's group for the duration (and restore what was there, so
    a tp=1 engine in the same process is unaffected)."""
    saved = parallel.tp()
    parallel.set_tp(groups.rank, groups.size, groups.model_group)
    try:
        yield
    finally:
        parallel.set_tp(saved.rank, saved.size, saved.group)
