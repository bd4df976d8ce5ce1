"""Runs the model for one step on one rank: loads the shard, sizes and owns the paged KV cache, turns a schedule
into flat tensors, and replays captured CUDA graphs for decode-only steps."""
from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.errors import OutOfMemoryError
from cluster.engine.sequence import Sequence
from cluster.kernels.reference import kv_row_bytes
from cluster.layers.attention import AttnMetadata
from cluster.layers.linear import pack_cpu_weights
from cluster.models.config import ModelConfig
from cluster.models.llama import shard_sizes
from cluster.models.registry import build_model
from cluster.quant import fp8

log = logging.getLogger(__name__)
GiB = 1 << 30
CPU_KV_BUDGET = 2 * GiB  # on the CPU, cache_max_entry_count is a share of at most this much


@dataclass
class StepInput:
    """Everything a rank needs to run a step: built by rank 0, broadcast to the others under tensor parallelism."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    logit_indices: torch.Tensor  # [N] int64, rows of the hidden states that get sampled
    max_context_len: int
    decode_only: bool
    embeds: torch.Tensor | None = None  # [M, hidden] image embeddings (LLaVA) that replace rows embed_rows [M]
    embed_rows: torch.Tensor | None = None

    def to(self, device: torch.device) -> "StepInput":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return StepInput(**moved)


def load_shard(model_dir: Path, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Memory-map the rank's converted shard (copied to the GPU when there is one)."""
    from safetensors.torch import load_file

    path = model_dir / f"rank{rank}.safetensors"
    if device.type == "cuda":
        need = path.stat().st_size
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise OutOfMemoryError(f"model shard needs {need / GiB:.1f} GiB, GPU has {free / GiB:.1f} GiB free; "
                                   "use a larger --tp or a smaller (or quantized) model")
    return load_file(str(path), device=str(device))


def default_device(engine_cfg: EngineConfig) -> torch.device:
    if engine_cfg.device:
        return torch.device(engine_cfg.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class ModelRunner:
    """One rank's model and KV cache. Constructing it loads the weights; the executor then runs its phases in order:
    profile() -> init_cache(num_blocks) -> capture(), with the ranks agreeing on num_blocks in between."""

    can_overlap = True  # execute() takes input ids still on the device

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], engine_cfg: EngineConfig,
                 device: torch.device, session_len: int, tp_rank: int = 0, tp_size: int = 1):
        self.cfg, self.engine_cfg, self.device = cfg, engine_cfg, device
        if engine_cfg.quant_policy == "fp8":
            fp8.check_device(device, "quant_policy='fp8' (an e4m3 KV cache)",
                             "--quant-policy 8 (int8, 1.9x the tokens) instead")
        self.session_len = session_len
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.block_size = engine_cfg.block_size
        self.max_blocks_per_seq = -(-session_len // self.block_size)
        with torch.device("meta"):
            self.model = build_model(cfg, tp_size)
        self.model.load_state_dict(weights, assign=True, strict=True)
        self.model.eval()
        if device.type == "cpu":
            pack_cpu_weights(self.model)
        self.dtype = self.model.embed_tokens.weight.dtype
        for rotary in self.model.rotaries():
            rotary.build_cache(max(session_len, 1) + 1)
        self.num_blocks = 0  # no KV cache until init_cache()
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None
        self.free_memory_for_cache: int | None = None  # CUDA: what profile() found free for the cache
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.max_graph_batch = 0  # decode steps of up to this many sequences replay a graph

    # -- KV cache ----------------------------------------------------------------------------------------------
    @property
    def kv_heads_per_rank(self) -> int:
        return shard_sizes(self.cfg, self.tp_size)["kv_heads"]

    @property
    def kv_bits(self):
        """The KV cache's quant_policy: 0 (the model dtype), 8 (int8), 4 (4-bit) or 'fp8' (e4m3)."""
        return self.engine_cfg.quant_policy

    @property
    def block_bytes(self) -> int:
        """K and V of one block in every layer (reference.kv_row_bytes a row)."""
        row = kv_row_bytes(self.kv_bits, self.cfg.head_dim, torch.tensor([], dtype=self.dtype).element_size())
        return 2 * self.cfg.num_layers * self.block_size * self.kv_heads_per_rank * row

    def init_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache, num_blocks blocks in every layer (replacing any cache there was), and its
        scales in reference.py's layouts. Zero-filled: padded decode reads slots past a context, which must be
        finite (see reference.py). The fp8 cache's scales are 1.0: e4m3 holds +-448, far beyond the K/V values of
        the models served here, with a 3-bit mantissa at every magnitude."""
        self.free_cache()
        bits, d, hkv = self.kv_bits, self.cfg.head_dim, self.kv_heads_per_rank
        layers = (2, self.cfg.num_layers)
        dtype = {0: self.dtype, 8: torch.int8, 4: torch.uint8, "fp8": torch.float8_e4m3fn}[bits]
        self.kv_cache = torch.zeros(layers + (num_blocks, self.block_size, hkv, d // 2 if bits == 4 else d),
                                    dtype=dtype, device=self.device)
        if bits == "fp8":
            self.kv_scales = torch.ones(layers + (hkv,), dtype=torch.float32, device=self.device)
        elif bits:
            self.kv_scales = torch.zeros(layers + (num_blocks, hkv, self.block_size) + ((2,) if bits == 4 else ()),
                                         dtype=torch.float32, device=self.device)
        else:
            self.kv_scales = None
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            if self.kv_scales is not None:
                attn.k_scale, attn.v_scale = self.kv_scales[0, i], self.kv_scales[1, i]
        self.num_blocks = num_blocks

    def free_cache(self) -> None:
        """Drop the KV cache (profile's warm-up cache, or one init_cache replaces)."""
        for attn in self.model.attention_layers():  # the layers' views too, or the cache stays allocated
            attn.k_cache = attn.v_cache = torch.empty(0)
            attn.k_scale = attn.v_scale = None
        self.kv_cache = self.kv_scales = None
        self.num_blocks = 0

    def profile(self) -> int:
        """How many KV blocks fit: cache_max_entry_count of the memory left after the weights and a warm-up at full
        batch (a fixed num_blocks when configured). Raises OutOfMemoryError below one session's worth."""
        ec = self.engine_cfg
        need_one = -(-self.session_len // self.block_size)
        if ec.num_blocks:
            num = ec.num_blocks
        elif self.device.type == "cuda":
            self.init_cache(need_one + ec.max_batch_size)  # the warm-up's, freed before measuring
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._warmup()
            peak_extra = torch.cuda.max_memory_allocated(self.device) - base
            self.free_cache()
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            self.free_memory_for_cache = max(0, free - peak_extra)
            num = int(self.free_memory_for_cache * ec.cache_max_entry_count) // self.block_bytes
        else:
            avail = min(_mem_available(), CPU_KV_BUDGET)  # host RAM is shared with everything else here
            num = int(avail * ec.cache_max_entry_count) // self.block_bytes
            num = min(num, ec.max_batch_size * (need_one + 1))  # more than every sequence can use is waste here
        if num < need_one:
            raise OutOfMemoryError(
                f"KV cache of {num} blocks ({num * self.block_bytes / GiB:.2f} GiB) holds {num * self.block_size} "
                f"tokens, less than one session of {self.session_len} tokens; raise cache_max_entry_count "
                f"(now {ec.cache_max_entry_count}), lower session_len, or use a larger tp")
        return num

    def _warmup(self) -> None:
        ec = self.engine_cfg
        n_seqs = max(1, min(ec.max_batch_size, ec.max_prefill_token_num // max(1, min(self.session_len, 512))))
        tokens = min(ec.max_prefill_token_num, self.session_len * n_seqs)
        per = tokens // n_seqs
        plan_lens = [per] * n_seqs
        step = self._dummy_prefill(plan_lens)
        with torch.inference_mode():
            self.execute(step)

    def _compile_kernels(self) -> None:
        """JIT-compile the kernel variants of prefill-heavy and decode-heavy eager steps now, not mid-request."""
        n = min(128, self.session_len - 1)
        for lens in ([n], [n, n], [n // 4] + [1] * 7, [1]):  # [1]: one row, the GEMV's autotuning
            self.execute(self._dummy_prefill(lens))
        torch.cuda.synchronize()

    def _dummy_prefill(self, lens: list[int]) -> StepInput:
        bs = self.block_size
        ids, pos, slots, tables, cu = [], [], [], [], [0]
        for n in lens:
            ids += [0] * n
            pos += list(range(n))
            slots += [-1] * n
            tables.append([0] * -(-n // bs))
            cu.append(cu[-1] + n)
        width = max(len(t) for t in tables)
        return StepInput(
            input_ids=torch.tensor(ids), positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            context_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            logit_indices=torch.tensor([c - 1 for c in cu[1:]]), max_context_len=max(lens), decode_only=False,
        ).to(self.device)

    # -- steps -------------------------------------------------------------------------------------------------
    def prepare(self, plan: list[tuple[Sequence, int]], bm: BlockManager, to_device: bool = True) -> StepInput:
        """Flatten the schedule: each sequence's next n tokens, their slots, and which rows to sample.

        Built as two flat host buffers (one int64, one int32) so a step costs two pinned copies, not seven.
        to_device=False keeps it on the host (tensor parallelism broadcasts it from there)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        rows: list[int] = []
        decode_only = True
        for seq, n in plan:
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:  # start == len(seq): a step launched ahead, whose token is fed on the device
                ids.append(seq.token_ids[start] if start < len(seq.token_ids) else 0)
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                decode_only = False
                ids.extend(seq.token_ids[start:end])
                pos.extend(range(start, end))
                slots.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            cu.append(cu[-1] + n)
            ctx.append(end)
            if end >= len(seq.token_ids):
                rows.append(cu[-1] - 1)
        embeds, embed_rows = _image_rows(plan)
        decode_only = decode_only and embeds is None
        width = max(len(s.block_table) for s, _ in plan)
        tables: list[int] = []
        for s, _ in plan:
            tables.extend(s.block_table)
            tables.extend([0] * (width - len(s.block_table)))
        T, B = len(ids), len(plan)
        big = torch.tensor(ids + pos + slots + rows, dtype=torch.long)
        small = torch.tensor(tables + ctx + cu, dtype=torch.int32)
        if self.device.type == "cuda" and to_device:
            big = big.pin_memory().to(self.device, non_blocking=True)
            small = small.pin_memory().to(self.device, non_blocking=True)
        return StepInput(
            input_ids=big[:T], positions=big[T:2 * T], slot_mapping=big[2 * T:3 * T], logit_indices=big[3 * T:],
            block_tables=small[:B * width].view(B, width), context_lens=small[B * width:B * width + B],
            cu_seqlens_q=small[B * width + B:], max_context_len=max(ctx), decode_only=decode_only,
            embeds=embeds, embed_rows=None if embed_rows is None else embed_rows.to(big.device, non_blocking=True),
        )

    @torch.inference_mode()
    def execute(self, step: StepInput, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the step's sampled rows. `input_ids` (on the device) replaces the step's
        token ids: the tokens the previous step drew, not yet seen by the host."""
        if step.input_ids.device != self.device:
            step = step.to(self.device)
        if input_ids is not None:
            step.input_ids = input_ids
        if step.decode_only and step.context_lens.shape[0] <= self.max_graph_batch:
            return self._replay(step)
        meta = AttnMetadata(step.slot_mapping, step.block_tables, step.context_lens, step.cu_seqlens_q,
                            step.max_context_len, step.decode_only)
        hidden = self.model(step.input_ids, step.positions, meta, step.embeds, step.embed_rows)
        return self.model.compute_logits(hidden[step.logit_indices]).float()

    def close(self) -> None:
        """Nothing to stop: one rank's memory goes with the runner."""

    # -- CUDA graphs for decode ------------------------------------------------------------------------------------
    def capture(self) -> None:
        """After init_cache, on CUDA: JIT-compile the eager steps' kernel variants now rather than mid-request, then
        capture decode-only steps as CUDA graphs (again, if they were: CLUSTER_PDL may have changed). A no-op on
        the CPU; graphs are skipped with cuda_graph off or the reference kernels."""
        self.graphs, self.max_graph_batch = {}, 0
        if self.device.type != "cuda":
            return
        self._compile_kernels()
        if self.engine_cfg.cuda_graph and os.environ.get("CLUSTER_KERNELS") != "reference":
            self._capture_graphs()

    def _graph_batch_sizes(self) -> list[int]:
        top = min(self.engine_cfg.max_batch_size, 512)
        sizes = [1, 2, 4, 8] + list(range(16, top + 1, 16))
        return sorted({s for s in sizes if s <= top} | {top})

    def _capture_graphs(self) -> None:
        max_bs = max(self._graph_batch_sizes())
        dev = self.device
        self._g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self._g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self._g_slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self._g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self._g_ctx = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self._g_cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self._g_out: dict[int, torch.Tensor] = {}
        max_ctx = self.max_blocks_per_seq * self.block_size
        pool = None
        for bs in reversed(self._graph_batch_sizes()):
            meta = AttnMetadata(self._g_slots[:bs], self._g_tables[:bs], self._g_ctx[:bs], self._g_cu[:bs + 1],
                                max_ctx, True)
            with torch.inference_mode():
                for _ in range(2):  # warm up (Triton compiles) outside the capture
                    self.model.compute_logits(self.model(self._g_ids[:bs], self._g_pos[:bs], meta))
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self.model.compute_logits(self.model(self._g_ids[:bs], self._g_pos[:bs], meta)).float()
            pool = g.pool()
            self.graphs[bs] = g
            self._g_out[bs] = out
        torch.cuda.synchronize()
        self.max_graph_batch = max_bs

    def _replay(self, step: StepInput) -> torch.Tensor:
        n = step.context_lens.shape[0]
        bs = next(s for s in sorted(self.graphs) if s >= n)
        self._g_ids[:n].copy_(step.input_ids)
        self._g_pos[:n].copy_(step.positions)
        self._g_slots[:bs].fill_(-1)
        self._g_slots[:n].copy_(step.slot_mapping)
        self._g_ctx[:bs].fill_(1)
        self._g_ctx[:n].copy_(step.context_lens)
        w = step.block_tables.shape[1]
        self._g_tables[:n, :w].copy_(step.block_tables)
        self.graphs[bs].replay()
        return self._g_out[bs][:n]


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def _image_rows(plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The image embeddings this step's tokens need, and the rows of the flat batch they go to."""
    parts, rows, row0 = [], [], 0
    for seq, n in plan:
        if seq.image_embeds is not None:
            start = seq.num_computed_tokens
            pos = seq.image_positions
            lo, hi = bisect.bisect_left(pos, start), bisect.bisect_left(pos, start + n)
            if hi > lo:
                parts.append(seq.image_embeds[lo:hi])
                rows.extend(row0 + p - start for p in pos[lo:hi])
        row0 += n
    if not parts:
        return None, None
    return torch.cat(parts), torch.tensor(rows, dtype=torch.long)
