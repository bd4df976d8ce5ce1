"""The step loop of one model replica: schedule -> run the model -> sample -> detokenize -> stop checks."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.config import GUIDED, EngineConfig, GenerationConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.errors import PromptTooLongError, RequestFailedError
from cluster.engine.grammar import GrammarKey, Grammars, grammar_key
from cluster.engine.multimodal import has_images, prompt_images
from cluster.layers.mrope import mrope_positions
from cluster.engine.sampler import Drawn, draw, read_out, to_device
from cluster.engine.scheduler import Scheduler
from cluster.engine.resume import replay
from cluster.engine.sequence import Sequence
from cluster.engine.startup import Phases
from cluster.engine.tokenizer import IncrementalDetokenizer, PreparedPrompt, Prompt, Tokenizer
from cluster.executor import Executor, create_executor, resolve_model
from cluster.kernels import jit_cache
from cluster.messages import Delta

log = logging.getLogger(__name__)
_ids = itertools.count()
# image tokens one call of the vision encoder produces at most (one request's images are never split): the requests
# added between two steps are encoded together up to this (at Qwen2.5-VL-7B's width, about 2 GB of the tower's
# activations for 16,384 tokens = 65,536 patches)
VISION_BATCH_TOKENS = 16384


@dataclass
class RequestOutput(Delta):
    """What one step produced for one request: the new text/tokens since its previous output (logprobs: the
    sampler's entries, token ids and their logprobs)."""

    request_id: str = ""
    error: Exception | None = None  # set when this request failed (finish_reason "error"): what its caller gets


@dataclass
class Response(Delta):
    """A request's output as the pipeline returns it: its RequestOutputs merged (Delta.merge)."""

    index: int = 0  # which of the call's prompts

    def __str__(self) -> str:
        return self.text


@dataclass
class Launched:
    """A step on its way through the GPU: which sequences it samples, and their tokens once drawn."""

    plan: list[tuple[Sequence, int]]
    sampled: list[Sequence]
    drawn: Drawn | None
    logits: torch.Tensor | None = None  # a step ahead under a grammar: drawn once the tokens in flight are accepted


@dataclass
class EngineStats:
    tokens_in: int = 0
    tokens_out: int = 0
    steps: int = 0
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens were read
    finished: int = 0
    aborted: int = 0
    failed: int = 0  # requests failed alone (finish_reason "error") while the engine went on
    started: float = field(default_factory=time.time)
    # the image encoder, apart from the steps: its seconds (device-synced), the images it encoded and its calls (one
    # call encodes the images of every request added since the previous step, up to VISION_BATCH_TOKENS)
    vision_seconds: float = 0.0
    images_encoded: int = 0
    vision_calls: int = 0


class LLMEngine:
    """One replica's step loop over an Executor (cluster.executor). LLMEngine(model, engine_config) builds the
    executor for engine_config.tp (init_method: rank 0 of a group whose followers run elsewhere, see
    cluster/executor/tp.py); LLMEngine(runner=..., tokenizer=...) runs on one already built."""

    def __init__(self, model: str | None = None, engine_config: EngineConfig | None = None,
                 runner: Executor | None = None, tokenizer: Tokenizer | None = None, *,
                 init_method: str | None = None):
        ec = engine_config or EngineConfig()
        self.engine_config = ec
        self.model_path = model
        self.vision = None  # a vision-language model's image encoder (cluster/models/vision.py)
        self.model_dir: Path | None = None
        self.phases = Phases()
        if runner is None:
            jit_cache.starting()
            self.model_dir, cfg, session_len = self.phases.run("convert", resolve_model, model, ec, progress=True)
            runner = create_executor(self.model_dir, cfg, ec, session_len, init_method=init_method)
            self.phases.merge(getattr(runner, "runner", runner).phases)  # a TPExecutor's: rank 0's runner's
            tokenizer = tokenizer or self.phases.run("tokenizer", Tokenizer, self.model_dir)
            if cfg.vision:
                from cluster.models.vision import vision_encoder

                self.vision = self.phases.run("vision", vision_encoder, self.model_dir, cfg.vision, runner.device,
                                              runner.dtype)
        if ec.overlap_steps and not runner.can_overlap:
            raise ValueError("overlap_steps needs a single-rank engine (tp=1); leave it unset with --tp > 1")
        self.overlap = ec.overlap_steps if ec.overlap_steps is not None else (
            runner.can_overlap and runner.device.type == "cuda")
        self.runner, self.tokenizer = runner, tokenizer
        self.model_config, self.session_len = runner.cfg, runner.session_len
        self.max_batch_size = getattr(runner, "max_batch_size", None) or ec.max_batch_size or 128
        log.info("KV cache: %d blocks of %d = %d tokens (quant_policy %s: 8 and fp8 hold about 2x, 4 about 3.6x "
                 "the tokens of 0 in the same memory); up to %d sequences a step", runner.num_blocks, ec.block_size,
                 runner.num_blocks * ec.block_size, ec.quant_policy, self.max_batch_size)
        self._fresh_state()
        self.eos_ids = set(runner.cfg.eos_token_ids)
        self._in_flight: Launched | None = None
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        # the logits' width: a tokenizer's ids past it are never drawn, a padded vocabulary's extra ids never allowed
        self.grammars = Grammars(tokenizer.hf, runner.cfg.vocab_size, tokenizer.grammar_tokens) if tokenizer else None
        if self.model_dir is not None:  # built here: the start is over, and anything compiled from now is logged
            if runner.device.type == "cuda":
                self.phases.run("requests", self.warm_up_requests)
            log.info("%s (%s)", self.phases.summary(), self.model_dir)
            jit_cache.mark_ready()

    def warm_up_requests(self) -> None:
        """Two short requests through the whole request path (prepare, sampler greedy and sampled with top-k/top-p
        and logprobs, pinned copies, detokenizer), then a fresh cache, scheduler and counters: on a GPU the first
        request after start-up otherwise pays for the sampler's first kernels and the allocators' first blocks
        (35 ms against 14 ms for the next ones, Llama-3-8B shape on the H200)."""
        gens = [GenerationConfig(max_new_tokens=3, temperature=0.0, ignore_eos=True),
                GenerationConfig(max_new_tokens=3, temperature=0.7, top_k=20, top_p=0.9, logprobs=2,
                                 ignore_eos=True, seed=0)]
        self.generate([[1] * 8, [2] * 8], gens)
        self._fresh_state()

    def _fresh_state(self) -> None:
        """An empty block manager (prefix cache included), scheduler, request table and counters."""
        ec = self.engine_config
        self.bm = BlockManager(self.runner.num_blocks, ec.block_size, ec.enable_prefix_caching)
        self.scheduler = Scheduler(self.bm, self.max_batch_size, ec.max_prefill_token_num, self.session_len)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._unencoded: list[tuple[Sequence, PreparedPrompt, int]] = []  # image requests to encode (their tokens)

    # -- requests ------------------------------------------------------------------------------------------------
    def validate(self, prompt: PreparedPrompt, gen: GenerationConfig) -> None:
        """Admission checks, on the caller's thread: a request that passes cannot break a step, which would fail
        every request in it."""
        ids = prompt.token_ids
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + gen.max_new_tokens > self.session_len:
            raise PromptTooLongError(len(ids), gen.max_new_tokens, self.session_len)
        self._check_token_ids(ids, gen)  # after the length check: at most session_len ids
        key = self._grammar_key(prompt, gen)
        if key is not None:
            self.grammars.get(key)  # compiled here, on the caller's thread; the engine's thread finds it cached

    def _grammar_key(self, prompt: PreparedPrompt, gen: GenerationConfig) -> GrammarKey | None:
        if not (gen.forces_tools or any(getattr(gen, f) is not None for f in GUIDED)):
            return None
        if self.grammars is None:
            raise ValueError("structured output needs the model's tokenizer; this engine has none")
        tok = self.tokenizer
        return grammar_key(gen, tok.tool_format, tok.special_tokens, tok.think_state(prompt))

    def _check_token_ids(self, prompt_ids: list[int], gen: GenerationConfig) -> None:
        """Ids outside the vocabulary fail inside a step: in the embedding (prompt ids; image tokens are real ids
        too) or in the sampler's min_new_tokens mask (stop_token_ids)."""
        vocab = self.model_config.vocab_size
        _check_vocab(prompt_ids, "prompt token id", vocab)
        _check_vocab(gen.stop_token_ids, "stop_token_ids entry", vocab)

    def add_request(self, prompt: Prompt | PreparedPrompt, gen_config: GenerationConfig | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request. A raw prompt is prepared and validated here; a PreparedPrompt was, by the caller (see
        AsyncEngine.submit), and is taken as it is."""
        gen = gen_config or GenerationConfig()
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.prepare_prompt(prompt)
            self.validate(prompt, gen)
        rid = request_id or f"req-{next(_ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        ids = list(prompt.token_ids)
        seq = Sequence(rid, ids, gen, num_resumed=prompt.resumed)
        image_tokens = self._attach_images(seq, prompt) if prompt.pixel_values is not None else 0
        seq.stop_ids = frozenset(gen.stop_token_ids) | (frozenset() if gen.ignore_eos else frozenset(self.eos_ids))
        if gen.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(gen.seed)
        if self.tokenizer is not None:
            seq.parser = self.tokenizer.output_parser(prompt, gen.uses_tools)
            skip = gen.skip_special_tokens and not self.tokenizer.keeps_markers(seq.parser)
            seq.detok = IncrementalDetokenizer(self.tokenizer, prompt.own_ids, skip, gen.stop_words)
        key = self._grammar_key(prompt, gen)
        if key is not None:
            seq.matcher = self.grammars.matcher(self.grammars.get(key), seq.stop_ids)
        if prompt.resumed:  # failover: the output already sent goes through the detokenizer, parser and grammar
            replay(seq, ids[len(ids) - prompt.resumed:])
        self.seqs[rid] = seq
        if image_tokens:  # encoded at the next step, with the images of every request added before it
            self._unencoded.append((seq, prompt, image_tokens))
        self.scheduler.add(seq)
        self.stats.tokens_in += len(ids)
        return rid

    def prepare_prompt(self, prompt: Prompt | PreparedPrompt) -> PreparedPrompt:
        """Token ids, and preprocessed images if any: everything about a prompt that can fail, checked on the
        caller's thread (images decoded and resized here, before tokenizing: an image's size may set its token
        count; the vision tower runs on the engine's thread)."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        image_token = self.model_config.vision.get("image_token_id")
        if not has_images(prompt):
            ids = self._prompt_ids(prompt)
            if image_token is not None and image_token in ids:
                raise ValueError("the prompt has image tokens but no image; pass images as content parts")
            return PreparedPrompt(ids, chat=_is_chat(prompt))
        if self.vision is None:
            raise ValueError("this model takes no images (it is not a vision-language model)")
        pixels, grid = self.vision.preprocess(prompt_images(prompt))
        ids = self._prompt_ids(prompt, self.vision.token_counts(pixels, grid))
        return PreparedPrompt(ids, pixels, chat=True, image_grid=grid)

    def _attach_images(self, seq: Sequence, prompt: PreparedPrompt) -> int:
        """The images' tokens' positions and prefix-cache keys onto the sequence; with M-RoPE, its position ids
        (cluster/layers/mrope.py). Returns the image tokens; their embeddings come at the next step
        (_encode_images)."""
        pixels, grid = prompt.pixel_values, prompt.image_grid
        counts = self.vision.token_counts(pixels, grid)
        vision = self.model_config.vision
        token = vision["image_token_id"]
        positions = [i for i, t in enumerate(seq.token_ids) if t == token]
        if len(positions) != sum(counts):
            raise ValueError(f"{len(positions)} image tokens for {len(counts)} image(s) of {counts} tokens")
        seq.image_positions = positions
        first = 0
        for digest, n in zip(self.vision.digests(pixels, grid), counts):
            for j in range(n):  # negative: never a real token id
                seq.image_keys[positions[first + j]] = -1 - ((digest + j) & ((1 << 60) - 1))
            first += n
        if vision.get("mrope_section"):
            seq.mrope_positions, seq.rope_delta = mrope_positions(seq.token_ids, token, grid.tolist(),
                                                                  vision["spatial_merge_size"])
        return len(positions)

    def _encode_images(self) -> list[RequestOutput]:
        """The images of every request added since the previous step (and not aborted since), in as few calls of
        the encoder as VISION_BATCH_TOKENS allows: an encoder with encode_many (Qwen2-VL's tower, whose cu_seqlens
        keep images apart) takes several requests' images at once, each request's embeddings as if alone. A call
        that fails is retried one request at a time; a request whose own images fail is failed alone (its output
        is returned). The time, device-synced, goes to stats.vision_seconds."""
        pending = [p for p in self._unencoded if not p[0].is_finished]
        self._unencoded = []
        groups: list[list[tuple[Sequence, PreparedPrompt, int]]] = []
        for item in pending:
            if groups and sum(n for *_, n in groups[-1]) + item[2] <= VISION_BATCH_TOKENS:
                groups[-1].append(item)
            else:
                groups.append([item])
        failed = []
        for group in groups:
            try:
                embeds = self._encode([(p.pixel_values, p.image_grid) for _, p, _ in group])
            except Exception as e:  # noqa: BLE001 - retried alone below; the lone request fails with it
                if len(group) == 1:
                    failed.append(self._fail(group[0][0], e, "while its images were encoded"))
                    continue
                log.warning("encoding %d requests' images together failed (%r); encoding them one at a time",
                            len(group), e)
                embeds = []
                for seq, p, _ in group:
                    try:
                        embeds += self._encode([(p.pixel_values, p.image_grid)])
                    except Exception as e1:  # noqa: BLE001 - this request's images: it alone fails
                        failed.append(self._fail(seq, e1, "while its images were encoded"))
                        embeds.append(None)
            for (seq, _, _), e in zip(group, embeds):
                if e is not None:
                    seq.image_embeds = e
        return failed

    def _encode(self, items: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """One encoder call for several requests' images (one at a time for an encoder without encode_many):
        each request's [its image tokens, hidden]."""
        cuda = self.runner.device.type == "cuda"
        if cuda:  # a step in flight is not the encoder's time
            torch.cuda.synchronize(self.runner.device)
        t = time.perf_counter()
        many = getattr(self.vision, "encode_many", None)
        out = many(items) if many is not None else [self.vision.encode(p, g) for p, g in items]
        if cuda:
            torch.cuda.synchronize(self.runner.device)
        s = self.stats
        s.vision_seconds += time.perf_counter() - t
        s.vision_calls += 1
        s.images_encoded += sum(len(self.vision.token_counts(p, g)) for p, g in items)
        return out

    def _prompt_ids(self, prompt: Prompt, image_lens: list[int] | None = None) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.prompt_ids(prompt, image_lens)
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
        return self.scheduler.has_work()  # a step in flight only holds running sequences

    def recover(self, error: Exception) -> list[tuple[str, ValueError]]:
        """After step() raised `error`: the requests to blame, found by re-running the token-id admission checks on
        every live sequence (one that bypassed admission, or a check that missed), each with its own error. They are
        finished and their blocks freed; the step in flight is dropped and every other running sequence is
        preempted, to be recomputed from its tokens: its output so far and its detokenizer stay on it, so its
        stream goes on. Empty when nobody is to blame (a device fault): the engine is then not to be trusted."""
        blamed: list[tuple[Sequence, ValueError]] = []
        for seq in self.seqs.values():
            try:
                self._check_token_ids(seq.token_ids[:seq.num_prompt_tokens], seq.gen)
            except ValueError as e:
                blamed.append((seq, e))
        if not blamed:
            return []
        log.warning("step failed (%r); failing the request(s) to blame: %s", error,
                    ", ".join(seq.request_id for seq, _ in blamed))
        self._in_flight = None
        self.scheduler.requeue(self.seqs.values())
        for seq, _ in blamed:
            self.scheduler.finish(seq, "error")
            del self.seqs[seq.request_id]
            self.stats.failed += 1
        return [(seq.request_id, e) for seq, e in blamed]

    # -- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return what it produced (first, the images of the requests added since the previous
        step are encoded, together: _encode_images).

        With overlap on, a decode step is launched before the previous step's tokens are read: its input ids are
        those tokens, still on the device. The host then appends them and runs the stop checks while the GPU works,
        and the call returns the previous step's outputs; penalties and min_new_tokens count the token in flight.
        Anything the step ahead cannot know (a request to admit, a prefill chunk) ends the overlap: the step in flight
        is read out, and the next call schedules afresh."""
        failed = self._encode_images() if self._unencoded else []
        return failed + self._step()

    def _step(self) -> list[RequestOutput]:
        prev, self._in_flight = self._in_flight, None
        if prev is not None and all(seq.is_finished for seq in prev.sampled):
            prev = None  # all aborted while in flight: nothing to read
        if prev is not None:
            ahead = self.scheduler.schedule_ahead(prev.sampled) if self.overlap else []
            if ahead:
                row_of = {seq: i for i, seq in enumerate(prev.sampled)}
                rows = [row_of[seq] for seq, _ in ahead]
                ids = prev.drawn.tokens
                if rows != list(range(len(prev.sampled))):
                    ids = ids[to_device(rows, torch.long, ids.device)]
                # under a grammar the draw waits for the matchers: the forward runs while the host reads the tokens
                # in flight, accepts them and fills the masks
                constrained = any(seq.matcher is not None for seq, _ in ahead)
                self._in_flight = self._launch(ahead, ids, draw_now=not constrained)
                self.stats.steps_ahead += 1
            outputs = self._collect(prev)
            if self._in_flight is not None:
                launched = self._in_flight
                if launched.logits is not None:  # the tokens in flight are now in every sequence: no pending
                    launched.drawn, launched.logits = draw(launched.logits, launched.sampled), None
                self.scheduler.after_step(ahead)  # after the collect: K/V hashing needs the tokens just appended
            return outputs
        plan = self.scheduler.schedule()
        if not plan:
            return []
        launched = self._launch(plan)
        self.scheduler.after_step(plan)
        if self.overlap and self.scheduler.schedule_ahead(launched.sampled, dry_run=True):
            self._in_flight = launched
            return []
        return self._collect(launched)

    def _launch(self, plan: list[tuple[Sequence, int]], input_ids: torch.Tensor | None = None,
                draw_now: bool = True) -> Launched:
        step = self.runner.prepare(plan, self.bm)
        logits = self.runner.execute(step, input_ids) if input_ids is not None else self.runner.execute(step)
        self.stats.steps += 1
        sampled = [seq for seq, n in plan if seq.num_computed_tokens + n >= len(seq)]
        if not sampled:
            return Launched(plan, sampled, None)
        if not draw_now:
            return Launched(plan, sampled, None, logits)
        return Launched(plan, sampled, draw(logits, sampled, input_ids))

    def _collect(self, launched: Launched) -> list[RequestOutput]:
        if launched.drawn is None:
            return []
        result = read_out(launched.drawn, launched.sampled)
        outputs = []
        for seq, token, lp in zip(launched.sampled, result.tokens, result.logprobs):
            if seq.is_finished:
                continue  # aborted while its step was in flight
            try:
                outputs.append(self._append_token(seq, token, lp))
            except Exception as e:  # noqa: BLE001 - this request's own post-processing: it alone fails
                outputs.append(self._fail(seq, e))
        return outputs

    def _fail(self, seq: Sequence, error: Exception, where: str = "while its output was processed") -> RequestOutput:
        """Finish a request whose host-side post-processing (detokenizer, stop checks) or image encoding raised;
        the others go on."""
        log.error("request %s failed %s, after %d output tokens", seq.request_id, where, seq.num_output_tokens,
                  exc_info=error)
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        self.stats.failed += 1
        return RequestOutput("", [], None, "error", seq.num_prompt_tokens, seq.num_output_tokens,
                             seq.num_cached_prompt_tokens, request_id=seq.request_id,
                             error=RequestFailedError(error, where))

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
            if seq.matcher is not None and not seq.matcher.accept_token(token):
                raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
            if seq.detok is not None:
                seq.detok.add(token)
            if seq.detok is not None and seq.detok.stopped:
                reason = "stop"
            elif seq.matcher is not None and seq.matcher.is_terminated():
                reason = "stop"  # the grammar's end (a stop token it let through, say with ignore_eos)
            elif seq.num_output_tokens >= gen.max_new_tokens or len(seq) >= self.session_len:
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.seqs.pop(seq.request_id, None)
            self.stats.finished += 1
        text = seq.detok.take(final=reason is not None) if seq.detok is not None else ""
        reasoning, calls = "", None
        if seq.parser is not None:  # content, reasoning and tool calls apart (cluster.tool_parsers)
            text, reasoning, calls = seq.parser.feed(text, final=reason is not None)
            if reason == "stop" and seq.parser.called:
                reason = "tool_calls"
        return RequestOutput(text, [token], [lp] if lp is not None else None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_prompt_tokens, reasoning, calls or None,
                             request_id=seq.request_id)

    # -- offline generation ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], gen_configs: list[GenerationConfig] | GenerationConfig | None = None
                 ) -> list[Response]:
        gens = gen_configs if isinstance(gen_configs, list) else [gen_configs or GenerationConfig()] * len(prompts)
        rids = [self.add_request(p, g) for p, g in zip(prompts, gens)]
        acc: dict[str, Response] = {rid: Response(index=i) for i, rid in enumerate(rids)}
        pending = set(rids)
        try:
            while pending:
                for out in self.step():
                    if out.error is not None:
                        raise out.error
                    r = acc.get(out.request_id)
                    if r is None:
                        continue
                    r.merge(out)
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
            "kv_tokens_total": bm.num_blocks * bm.block_size,
            "kv_blocks_free": bm.num_free,
            "kv_usage": 1.0 - bm.num_free / bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            "prefix_cache_hit_tokens": bm.prefix_hits,
            "tokens_in": self.stats.tokens_in,
            "tokens_out": self.stats.tokens_out,
            "steps": self.stats.steps,
            "steps_ahead": self.stats.steps_ahead,
            **({"vision_seconds": self.stats.vision_seconds, "images_encoded": self.stats.images_encoded,
                "vision_calls": self.stats.vision_calls} if self.vision is not None else {}),
        }


def _is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _check_vocab(ids: list[int], what: str, vocab_size: int) -> None:
    """Every id an int in [0, vocab_size); min and max run in C over the list."""
    if not ids:
        return
    if not all(map(isinstance, ids, itertools.repeat(int))):
        raise ValueError(f"every {what} must be an integer")
    lo, hi = min(ids), max(ids)
    bad = lo if lo < 0 else hi if hi >= vocab_size else None
    if bad is not None:
        raise ValueError(f"{what} {bad} is out of range: this model's vocabulary has {vocab_size} ids "
                         f"(0..{vocab_size - 1}); use ids from this model's tokenizer")

