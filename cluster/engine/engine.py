"""The step loop of one model replica: schedule -> run the model -> sample -> detokenize -> stop checks."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.convert.cache import ensure_converted, resolve_dtype
from cluster.engine.block_manager import BlockManager
from cluster.engine.errors import PromptTooLongError
from cluster.engine.model_runner import ModelRunner, default_device, load_shard
from cluster.engine.sampler import sample
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from cluster.engine.tokenizer import IncrementalDetokenizer, Prompt, Tokenizer
from cluster.models.config import ModelConfig

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class RequestOutput:
    """What one step produced for one request: the new text/tokens since its previous output."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None
    input_token_len: int
    generate_token_len: int
    cached_token_len: int = 0


@dataclass
class Response:
    """A finished request, as the pipeline returns it."""

    text: str
    token_ids: list[int]
    input_token_len: int
    generate_token_len: int
    finish_reason: str | None
    logprobs: list[dict] | None = None
    index: int = 0
    cached_token_len: int = 0

    def __str__(self) -> str:
        return self.text


@dataclass
class EngineStats:
    tokens_in: int = 0
    tokens_out: int = 0
    steps: int = 0
    finished: int = 0
    aborted: int = 0
    started: float = field(default_factory=time.time)


class LLMEngine:
    def __init__(self, model: str | None = None, engine_config: EngineConfig | None = None,
                 runner: ModelRunner | None = None, tokenizer: Tokenizer | None = None):
        ec = engine_config or EngineConfig()
        self.engine_config = ec
        self.model_path = model
        if runner is None:
            device = default_device(ec)
            dtype = resolve_dtype(model, ec.dtype, device.type)
            model_dir = ensure_converted(model, ec.tp, dtype, ec.cache_dir)
            cfg = ModelConfig.load(model_dir / "config.json")
            self.session_len = self._session_len(cfg, ec)
            if ec.tp > 1:
                from cluster.workers.tp import TPExecutor  # the other ranks run in worker processes

                runner = TPExecutor(model_dir, cfg, ec, self.session_len)
            else:
                runner = ModelRunner(cfg, load_shard(model_dir, 0, device), ec, device, self.session_len)
            tokenizer = tokenizer or Tokenizer(model_dir)
            self.model_dir: Path | None = model_dir
        else:
            cfg = runner.cfg
            self.session_len = runner.session_len
            self.model_dir = None
        self.model_config = cfg
        self.runner = runner
        self.tokenizer = tokenizer
        self.bm = BlockManager(runner.num_blocks, ec.block_size, ec.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, ec.max_batch_size, ec.max_prefill_token_num)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.eos_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)

    @staticmethod
    def _session_len(cfg: ModelConfig, ec: EngineConfig) -> int:
        if ec.session_len and ec.session_len > cfg.max_position_embeddings:
            raise ValueError(f"session_len {ec.session_len} exceeds the model's context "
                             f"{cfg.max_position_embeddings}")
        return ec.session_len or cfg.max_position_embeddings

    # -- requests ------------------------------------------------------------------------------------------------
    def validate(self, prompt_token_len: int, gen: GenerationConfig) -> None:
        if prompt_token_len == 0:
            raise ValueError("prompt is empty")
        if prompt_token_len + gen.max_new_tokens > self.session_len:
            raise PromptTooLongError(prompt_token_len, gen.max_new_tokens, self.session_len)

    def add_request(self, prompt: Prompt, gen_config: GenerationConfig | None = None,
                    request_id: str | None = None) -> str:
        gen = gen_config or GenerationConfig()
        ids = self._prompt_ids(prompt)
        self.validate(len(ids), gen)
        rid = request_id or f"req-{next(_ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, gen)
        seq.stop_ids = frozenset(gen.stop_token_ids) | (frozenset() if gen.ignore_eos else frozenset(self.eos_ids))
        if gen.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(gen.seed)
        if self.tokenizer is not None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids, gen.skip_special_tokens, gen.stop_words)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        self.stats.tokens_in += len(ids)
        return rid

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.prompt_ids(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)  # a tokenizer-less engine (random-weight benchmarks) takes token ids only
        raise ValueError("this engine has no tokenizer: pass prompts as token ids")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        self.stats.aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        step = self.runner.prepare(plan, self.bm)
        logits = self.runner.execute(step)
        sampled = [seq for seq, n in plan if seq.num_computed_tokens + n == len(seq)]
        self.scheduler.after_step(plan)
        self.stats.steps += 1
        outputs = []
        if not sampled:
            return outputs
        result = sample(logits, sampled)
        for seq, token, lp in zip(sampled, result.tokens, result.logprobs):
            outputs.append(self._append_token(seq, token, lp))
        return outputs

    def _append_token(self, seq: Sequence, token: int, lp: dict | None) -> RequestOutput:
        seq.token_ids.append(token)
        self.stats.tokens_out += 1
        if lp is not None:
            seq.logprobs.append(lp)
        gen = seq.gen
        reason = None
        if token in seq.stop_ids and seq.num_output_tokens >= gen.min_new_tokens:
            reason = "stop"
        else:
            if seq.detok is not None:
                seq.detok.add(token)
            if seq.detok is not None and seq.detok.stopped:
                reason = "stop"
            elif seq.num_output_tokens >= gen.max_new_tokens or len(seq) >= self.session_len:
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
            self.stats.finished += 1
        text = seq.detok.take(final=reason is not None) if seq.detok is not None else ""
        return RequestOutput(seq.request_id, text, [token], [lp] if lp is not None else None, reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_prompt_tokens)

    # -- offline generation ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], gen_configs: list[GenerationConfig] | GenerationConfig | None = None
                 ) -> list[Response]:
        gens = gen_configs if isinstance(gen_configs, list) else [gen_configs or GenerationConfig()] * len(prompts)
        rids = [self.add_request(p, g) for p, g in zip(prompts, gens)]
        acc: dict[str, Response] = {rid: Response("", [], 0, 0, None, None, i) for i, rid in enumerate(rids)}
        pending = set(rids)
        try:
            while pending:
                for out in self.step():
                    r = acc.get(out.request_id)
                    if r is None:
                        continue
                    _accumulate(r, out)
                    if out.finish_reason:
                        pending.discard(out.request_id)
        finally:
            for rid in pending:
                self.abort(rid)
        return [acc[rid] for rid in rids]

    def stats_dict(self) -> dict:
        bm = self.bm
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free,
            "kv_usage": 1.0 - bm.num_free / bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            "prefix_cache_hit_tokens": bm.prefix_hits,
            "tokens_in": self.stats.tokens_in,
            "tokens_out": self.stats.tokens_out,
            "steps": self.stats.steps,
        }


def _accumulate(r: Response, out: RequestOutput) -> None:
    r.text += out.text
    r.token_ids += out.token_ids
    if out.logprobs:
        r.logprobs = (r.logprobs or []) + out.logprobs
    r.input_token_len = out.input_token_len
    r.generate_token_len = out.generate_token_len
    r.finish_reason = out.finish_reason
    r.cached_token_len = out.cached_token_len
