"""One request's state inside the engine: its tokens, where its KV lives, and how far it has been computed."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from cluster.config import GenerationConfig

_counter = itertools.count()


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    gen: GenerationConfig
    num_prompt_tokens: int = 0
    num_resumed: int = 0  # failover: of the prompt's tokens, the trailing ones another replica already generated
    arrival: int = field(default_factory=lambda: next(_counter))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # full blocks already registered in the prefix cache
    last_block_hash: int | None = None
    num_cached_prompt_tokens: int = 0  # prefix-cache hit of the latest admission
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict] = field(default_factory=list)
    num_preemptions: int = 0
    detok: object | None = None  # IncrementalDetokenizer, set by the engine
    stop_ids: frozenset[int] = frozenset()
    # structured output: the grammar's matcher (xgrammar), advanced on the host by each accepted token; and the
    # parser of tool calls / reasoning in the text (cluster.tool_parsers.OutputParser)
    matcher: object | None = None
    parser: object | None = None
    # images (LLaVA, Qwen2-VL): the embeddings [n, hidden] that replace the token embeddings at image_positions (sorted),
    # and a stand-in token per image position for the prefix cache, so two images never share cached K/V
    image_embeds: torch.Tensor | None = None
    image_positions: list[int] = field(default_factory=list)
    image_keys: dict[int, int] = field(default_factory=dict)
    # M-RoPE (Qwen2-VL): the [3, n] position ids of the prompt's tokens up to its last image's end; every later token
    # i sits at i + rope_delta (three equal ids: plain rope), generated tokens included (cluster/layers/mrope.py)
    mrope_positions: torch.Tensor | None = None
    rope_delta: int = 0

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        """The answer's tokens, those a failed replica already sent included: what OpenAI's presence and frequency
        penalties count, so a resumed request is penalised as the uninterrupted one."""
        return self.token_ids[self.num_prompt_tokens - self.num_resumed:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def cache_key(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) as the prefix cache knows them: image positions stand for their image's content."""
        tokens = self.token_ids[start:end]
        if self.image_keys:
            tokens = [self.image_keys.get(start + i, t) for i, t in enumerate(tokens)]
        return tuple(tokens)
