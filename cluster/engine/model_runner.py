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
from cluster.engine.startup import Phases
from cluster.kernels.reference import kv_row_bytes
from cluster.layers.attention import AttnMetadata
from cluster.layers.linear import pack_cpu_weights
from cluster.layers.mla import latent_dim
from cluster.layers.mrope import step_positions
from cluster.models.config import ModelConfig
from cluster.models.llama import shard_sizes
from cluster.models.registry import build_model
from cluster.quant import fp8

log = logging.getLogger(__name__)
GiB = 1 << 30
CPU_KV_BUDGET = 2 * GiB  # on the CPU, cache_max_entry_count is a share of at most this much
MAX_DEFAULT_BATCH = {"cuda": 512, "cpu": 128}  # max_batch_size's default is at most this (see default_batch_size)
MIN_DEFAULT_BATCH = 128
TOKENS_PER_DEFAULT_SEQ = 256


def default_batch_size(num_blocks: int, block_size: int, device: torch.device) -> int:
    """max_batch_size when unset: as many sequences as the cache holds at 256 tokens each (a short chat), between
    128 and the CUDA graphs' range (512; 128 on the CPU). Sequences that outgrow the cache are preempted and
    recomputed, not refused, so a small cache keeps 128."""
    cap = MAX_DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    return min(cap, max(MIN_DEFAULT_BATCH, num_blocks * block_size // TOKENS_PER_DEFAULT_SEQ))


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
    mrope: torch.Tensor | None = None  # [3, T] M-RoPE position ids (Qwen2-VL), when the step holds image tokens

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
        if cfg.kv_lora_rank and engine_cfg.quant_policy:
            raise ValueError(f"quant_policy {engine_cfg.quant_policy!r} is not supported for multi-head latent "
                             "attention (DeepSeek-V2/V3): its latent cache is in the model dtype; use quant_policy 0")
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
        # sequences a step may hold: EngineConfig.max_batch_size, else from the cache's size (set by init_cache)
        self.max_batch_size = engine_cfg.max_batch_size or MAX_DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None
        self.free_memory_for_cache: int | None = None  # CUDA: what profile() found free for the cache
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.max_graph_batch = 0  # decode steps of up to this many sequences replay a graph
        self.phases = Phases()  # what the start spent (cluster/engine/startup.py); the executor adds its phases

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
        """K and V of one block in every layer (reference.kv_row_bytes a row); MLA: one latent row a token a layer."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        if self.cfg.kv_lora_rank:
            return self.cfg.num_layers * self.block_size * latent_dim(self.cfg) * elem
        row = kv_row_bytes(self.kv_bits, self.cfg.head_dim, elem)
        return 2 * self.cfg.num_layers * self.block_size * self.kv_heads_per_rank * row

    def init_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache, num_blocks blocks in every layer (replacing any cache there was), and its
        scales in reference.py's layouts. Zero-filled: padded decode reads slots past a context, which must be
        finite (see reference.py). The fp8 cache's scales are 1.0: e4m3 holds +-448, far beyond the K/V values of
        the models served here, with a 3-bit mantissa at every magnitude."""
        self.free_cache()
        self._allocate_cache(num_blocks)
        self.num_blocks = num_blocks
        if not self.engine_cfg.max_batch_size:
            self.max_batch_size = default_batch_size(num_blocks, self.block_size, self.device)

    def _allocate_cache(self, num_blocks: int) -> None:
        if self.cfg.kv_lora_rank:  # MLA: [layers, blocks, block_size, 1, L + R], K and V the same row
            self.kv_cache = torch.zeros((self.cfg.num_layers, num_blocks, self.block_size, 1, latent_dim(self.cfg)),
                                        dtype=self.dtype, device=self.device)
            for i, attn in enumerate(self.model.attention_layers()):
                attn.k_cache = attn.v_cache = self.kv_cache[i]
            return
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
            bound = self.max_batch_size  # before the cache's size sets a default: the warm-up's batch
            self.init_cache(need_one + bound)  # the warm-up's, freed before measuring
            self.max_batch_size = bound
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
            num = min(num, self.max_batch_size * (need_one + 1))  # more than every sequence can use is waste here
        if num < need_one:
            raise OutOfMemoryError(
                f"KV cache of {num} blocks ({num * self.block_bytes / GiB:.2f} GiB) holds {num * self.block_size} "
                f"tokens, less than one session of {self.session_len} tokens; raise cache_max_entry_count "
                f"(now {ec.cache_max_entry_count}), lower session_len, or use a larger tp")
        return num

    def _warmup(self) -> None:
        ec = self.engine_cfg
        n_seqs = max(1, min(self.max_batch_size, ec.max_prefill_token_num // max(1, min(self.session_len, 512))))
        tokens = min(ec.max_prefill_token_num, self.session_len * n_seqs)
        per = tokens // n_seqs
        plan_lens = [per] * n_seqs
        step = self._dummy_prefill(plan_lens)
        with torch.inference_mode():
            self.execute(step)

    def _compile_kernels(self) -> None:
        """JIT-compile the kernel variants of prefill-heavy and decode-heavy eager steps now, not mid-request; then
        one prefill of each size from 16 tokens to the step's budget, so cuBLAS has picked (and loaded) its kernel for
        each range of rows before a request of that length arrives."""
        n = min(128, self.session_len - 1)
        for lens in ([n], [n, n], [n // 4] + [1] * 7, [1]):  # [1]: one row, the GEMV's autotuning
            self.execute(self._dummy_prefill(lens))
        top = min(self.engine_cfg.max_prefill_token_num, self.session_len - 1)
        for t in sorted({min(top, 16 << i) for i in range(12)} | {top, 200}):
            if t <= top:
                self.execute(self._dummy_prefill([t]))
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
            delta = seq.rope_delta  # M-RoPE: text after an image sits at index + delta (0 for other models)
            if n == 1:  # start == len(seq): a step launched ahead, whose token is fed on the device
                ids.append(seq.token_ids[start] if start < len(seq.token_ids) else 0)
                pos.append(start + delta)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                decode_only = False
                ids.extend(seq.token_ids[start:end])
                pos.extend(range(start + delta, end + delta))
                slots.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            cu.append(cu[-1] + n)
            ctx.append(end)
            if end >= len(seq.token_ids):
                rows.append(cu[-1] - 1)
        embeds, embed_rows = _image_rows(plan)
        mrope = _mrope_rows(plan)
        decode_only = decode_only and embeds is None and mrope is None
        width = max(len(s.block_table) for s, _ in plan)
        tables: list[int] = []
        for s, _ in plan:
            tables.extend(s.block_table)
            tables.extend([0] * (width - len(s.block_table)))
        T, B = len(ids), len(plan)
        # Every segment starts 16-byte aligned: Triton specializes a kernel on its pointers' alignment, so a view
        # at an odd offset would compile another variant mid-request, whenever a step's token count is odd.
        t2, bw4, b4 = _up(T, 2), _up(B * width, 4), _up(B, 4)
        big = torch.tensor(_padded(ids, t2) + _padded(pos, t2) + _padded(slots, t2) + rows, dtype=torch.long)
        small = torch.tensor(_padded(tables, bw4) + _padded(ctx, b4) + cu, dtype=torch.int32)
        if self.device.type == "cuda" and to_device:
            big = big.pin_memory().to(self.device, non_blocking=True)
            small = small.pin_memory().to(self.device, non_blocking=True)
        return StepInput(
            input_ids=big[:T], positions=big[t2:t2 + T], slot_mapping=big[2 * t2:2 * t2 + T],
            logit_indices=big[3 * t2:], block_tables=small[:B * width].view(B, width),
            context_lens=small[bw4:bw4 + B], cu_seqlens_q=small[bw4 + b4:], max_context_len=max(ctx),
            decode_only=decode_only,
            embeds=embeds, embed_rows=None if embed_rows is None else embed_rows.to(big.device, non_blocking=True),
            mrope=None if mrope is None else mrope.to(big.device, non_blocking=True),
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
        hidden = self.model(step.input_ids, step.positions, meta, step.embeds, step.embed_rows, step.mrope)
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
        self.phases.run("kernels", self._compile_kernels)
        if self.engine_cfg.cuda_graph and os.environ.get("CLUSTER_KERNELS") != "reference":
            self.phases.run("graphs", self._capture_graphs)

    def _graph_batch_sizes(self) -> list[int]:
        top = min(self.max_batch_size, MAX_DEFAULT_BATCH["cuda"])
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
        # One fp32 logits buffer for every graph (a step's logits are read before the next step runs, in stream
        # order): a buffer per graph would hold [bs, vocab] for each of the ~36 sizes, 4 GiB at 512 for Llama 3.
        self._g_logits = torch.empty(max_bs, self.cfg.vocab_size, dtype=torch.float32, device=dev)
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
                    logits = self.model.compute_logits(self.model(self._g_ids[:bs], self._g_pos[:bs], meta))
                    self._g_logits[:bs].copy_(logits)
                    del logits
            pool = g.pool()
            self.graphs[bs] = g
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
        return self._g_logits[:n]


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded(values: list[int], length: int) -> list[int]:
    return values + [0] * (length - len(values))


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


def _mrope_rows(plan: list[tuple[Sequence, int]]) -> torch.Tensor | None:
    """[3, T] M-RoPE position ids of the step's tokens, when one of them lies in a prompt's image span (else None:
    every token's three ids are equal, and `positions` says them)."""
    if not any(s.mrope_positions is not None and s.num_computed_tokens < s.mrope_positions.shape[1] for s, _ in plan):
        return None
    return torch.cat([step_positions(s.mrope_positions, s.rope_delta, s.num_computed_tokens, s.num_computed_tokens + n)
                      for s, n in plan], dim=1)
