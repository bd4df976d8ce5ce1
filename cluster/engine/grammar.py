"""Constrained decoding with xgrammar: a request's constraint -> a compiled grammar (cached) -> a matcher per
sequence -> a token bitmask applied to the logits inside the sampler.

Constraints are compiled when a request is validated (LLMEngine.validate, on rank 0's prepare thread), never on
the step loop. They are cached by (tokenizer, constraint): one `Grammars` per engine, keyed by the constraint's
canonical text. The engine's thread only looks the grammar up and makes the sequence's matcher. Each step, the
host fills the bitmask of every constrained row from its matcher; the mask goes to the device with the logits
(a pinned buffer kept per engine thread, copied without blocking) and xgrammar's kernel applies it there (Triton on
CUDA, C++ on the CPU). The matcher accepts each token on the host after its step. With overlapped steps a
constrained batch still runs a step ahead: its forward is launched first and its tokens drawn once the host has
accepted the tokens in flight and filled the masks, so the fill runs while the GPU computes. Only rank 0, which
samples, needs a matcher.
"""
from __future__ import annotations

import atexit
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Optional

from cluster.config import GenerationConfig
from cluster.engine.string_bounds import chain_ebnf, warm_ebnf
from cluster.tool_parsers import ToolFormat

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_ENTRIES = 512  # compiled grammars kept per engine (least recently used dropped)
XGRAMMAR_CACHE_BYTES = 256 * 2**20
WARM_STRING_LENGTH = 256  # bounded strings up to this many characters are compiled once, in the background
WARM_STEP = 16  # ... that many characters a compile call
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class GrammarError(ValueError):
    """A constraint that cannot be compiled: a 400 naming the request field (`param`) and the problem."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarKey:
    """A constraint in canonical form: what a compiled grammar is cached by."""

    kind: str  # json_schema | json_object | regex | ebnf | structural_tag
    source: str
    param: str = field(default="response_format", compare=False)  # the request field it came from


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # key order kept: it is the output's order


def grammar_key(gen: GenerationConfig, tool_format: ToolFormat | None = None, specials: Collection[str] = (),
                think: Optional[str] = None) -> GrammarKey | None:
    """The request's constraint, or None. think: None (no reasoning block), "optional" (the output may open one)
    or "opened" (the prompt ended in <think>): the constraint then applies after the reasoning block."""
    key = _plain_key(gen, tool_format, specials)
    if key is None or think is None:
        return key
    inner = {"json_schema": lambda s: {"type": "json_schema", "json_schema": json.loads(s), "max_whitespace_cnt": 1},
             "json_object": lambda _: {"type": "json_schema", "json_schema": {"type": "object"},
                                       "max_whitespace_cnt": 1},
             "regex": lambda s: {"type": "regex", "pattern": s},
             "ebnf": lambda s: {"type": "grammar", "grammar": s},
             "structural_tag": lambda s: json.loads(s)["format"]}[key.kind](key.source)
    block = {"type": "tag", "begin": "" if think == "opened" else THINK_OPEN, "content": {"type": "any_text"},
             "end": THINK_CLOSE}
    prefix = block if think == "opened" else {"type": "optional", "content": block}
    return GrammarKey("structural_tag", _tag({"type": "sequence", "elements": [prefix, inner]}), key.param)


def _tag(fmt: dict) -> str:
    return _dumps({"type": "structural_tag", "format": fmt})


def _plain_key(gen: GenerationConfig, tool_format: ToolFormat | None, specials: Collection[str]) -> GrammarKey | None:
    rf = gen.response_format
    if rf is not None and rf.get("type", "text") != "text":
        if rf["type"] == "json_object":
            return GrammarKey("json_object", "", "response_format")
        if rf["type"] == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema", {"type": "object"})
            return GrammarKey("json_schema", _dumps(schema), "response_format")
        raise GrammarError(f"response_format: type {rf['type']!r} is not supported (text, json_object and "
                           "json_schema are)", "response_format")
    if gen.guided_json is not None:
        src = gen.guided_json
        if isinstance(src, str):
            try:
                src = json.loads(src)
            except ValueError:
                raise GrammarError("guided_json: not valid JSON text", "guided_json") from None
        return GrammarKey("json_schema", _dumps(src), "guided_json")
    if gen.guided_regex is not None:
        return GrammarKey("regex", gen.guided_regex, "guided_regex")
    if gen.guided_choice is not None:
        if not gen.guided_choice or any(not c for c in gen.guided_choice):
            raise GrammarError("guided_choice: give one or more non-empty strings", "guided_choice")
        choices = [{"type": "const_string", "value": c} for c in dict.fromkeys(gen.guided_choice)]
        return GrammarKey("structural_tag", _tag({"type": "or", "elements": choices}), "guided_choice")
    if gen.guided_grammar is not None:
        return GrammarKey("ebnf", gen.guided_grammar, "guided_grammar")
    if gen.forces_tools:
        return GrammarKey("structural_tag", _tag(tool_calls_format(gen, tool_format, specials)), "tools")
    return None


def _pieces(text: str, specials: Collection[str]) -> list[dict]:
    """Literal text as grammar elements: a special token of the tokenizer (Mistral's [TOOL_CALLS]) must be that
    token, which plain text never matches."""
    if not text:
        return []
    marks = sorted((s for s in specials if s and s in text), key=len, reverse=True)
    if not marks:
        return [{"type": "const_string", "value": text}]
    out: list[dict] = []
    for part in re.split("(" + "|".join(map(re.escape, marks)) + ")", text):
        if part in marks:
            out.append({"type": "token", "token": part})
        elif part:
            out.append({"type": "const_string", "value": part})
    return out


def tool_calls_format(gen: GenerationConfig, fmt: ToolFormat | None, specials: Collection[str] = ()) -> dict:
    """The output a forced tool_choice allows: calls in the family's format, each naming one of the allowed
    functions, with arguments that follow its `parameters` schema. A named function: exactly one call; 'required':
    one, or one or more with parallel_tool_calls."""
    from cluster.tool_parsers import FORMATS

    fmt = fmt or FORMATS["hermes"]
    functions = [t["function"] for t in gen.tools or []]
    named = isinstance(gen.tool_choice, dict)
    if named:
        functions = [f for f in functions if f["name"] == gen.tool_choice["function"]["name"]]

    def call(f: dict) -> dict:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        before, after = fmt.around_args(f["name"])
        return {"type": "sequence", "elements": [
            *_pieces(before, specials),
            {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": 1}, *_pieces(after, specials)]}

    one = call(functions[0]) if len(functions) == 1 else {"type": "or", "elements": [call(f) for f in functions]}
    calls = one
    if gen.parallel_tool_calls and not named:
        more = {"type": "sequence", "elements": [*_pieces(fmt.separator, specials), one]}
        calls = {"type": "sequence", "elements": [one, {"type": "star", "content": more}]}
    before, after = fmt.wrap.split("{calls}")
    return {"type": "sequence", "elements": [*_pieces(before, specials), calls, *_pieces(after, specials)]}


_WHAT = {"json_schema": "the JSON schema", "json_object": "the JSON grammar", "regex": "the regular expression",
         "ebnf": "the grammar", "structural_tag": "the constraint"}
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+\.(?:cc|h):\d+:\s*")


def _clean(e: BaseException) -> str:
    """xgrammar's message without its C++ source location; one line."""
    lines = [_LOCATION.sub("", ln).strip() for ln in str(e).strip().splitlines()]
    text = next((ln for ln in lines if ln), type(e).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


class Grammars:
    """The compiled grammars of one engine (its tokenizer and vocabulary width), each compiled once. Safe from any
    thread: compiling happens outside the lock, so the engine's thread, which only looks grammars up, never waits
    for a compile. `keep`: special tokens a grammar may name (the tool format's markers); every other special
    token is out of every grammar, where xgrammar would otherwise let its text into a JSON string (and the
    detokenizer then drop it)."""

    def __init__(self, hf_tokenizer, vocab_size: int, keep: Collection[str] = (), max_threads: int = 2,
                 warm_strings: int = WARM_STRING_LENGTH):
        self.hf, self.vocab_size, self.keep, self.max_threads = hf_tokenizer, vocab_size, set(keep), max_threads
        self.warm_strings = warm_strings  # the bounded-string chain built in the background (0: none)
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, Any] = OrderedDict()  # -> CompiledGrammar or GrammarError
        self._compiler = None
        self.compiles = 0

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                self._compiler = self._new_compiler()
                if self.warm_strings:
                    _Warmer(self).start()
            return self._compiler

    def _new_compiler(self):
        import xgrammar as xgr

        base = xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=self.vocab_size)
        vocab = list(base.decoded_vocab)  # each token's bytes; an empty one is never allowed (a stop token at the end)
        for i, t in (getattr(self.hf, "added_tokens_decoder", None) or {}).items():
            if t.special and t.content not in self.keep and i < len(vocab):
                vocab[i] = b""
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=base.stop_token_ids, add_prefix_space=base.add_prefix_space)
        # xgrammar's own cache (the pieces of grammars: a bounded string's automaton, say) within a bound
        return xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_limit_bytes=XGRAMMAR_CACHE_BYTES)

    def get(self, key: GrammarKey):
        """The compiled grammar for `key` (compiled now unless cached); GrammarError when it cannot be compiled
        (also cached: a bad schema sent again is refused at once)."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(key)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        if isinstance(hit, GrammarError):
            raise GrammarError(str(hit), key.param)
        return hit

    def _compile(self, key: GrammarKey):
        compiler = self._get_compiler()
        self.compiles += 1
        try:
            chained = _chained(key) if "Length" in key.source else None
            if chained is not None:
                return compiler.compile_grammar(chained)
            if key.kind == "json_schema":
                return compiler.compile_json_schema(key.source, any_whitespace=False, strict_mode=True)
            if key.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if key.kind == "regex":
                return compiler.compile_regex(key.source)
            if key.kind == "ebnf":
                return compiler.compile_grammar(key.source)
            return compiler.compile_structural_tag(key.source)
        except Exception as e:  # noqa: BLE001 - the caller's constraint: its problem goes back to them
            log.info("constraint refused (%s): %s", key.param, e)
            return GrammarError(f"{key.param}: {_WHAT[key.kind]} cannot be used: {_clean(e)}", key.param)

    def warm(self, max_len: int = WARM_STRING_LENGTH, stop: Optional[threading.Event] = None) -> None:
        """Build the masks of the bounded-string chain up to `max_len` characters into the compiler's cache, so
        that a schema's minLength / maxLength up to that costs nothing to compile (string_bounds.py). Runs on a
        background thread when the compiler is first made (call it to do that work yourself). In steps of
        WARM_STEP characters, each reusing the last, so that `stop` is seen between them."""
        compiler = self._get_compiler()
        for n in range(min(WARM_STEP, max_len), max_len + WARM_STEP, WARM_STEP):
            if stop is not None and stop.is_set():
                return
            compiler.compile_grammar(warm_ebnf(min(n, max_len)))

    def matcher(self, compiled, stop_ids: Collection[int]):
        """A sequence's own matcher; the grammar's end lets only `stop_ids` through (the request's stop tokens)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None)


class _Warmer(threading.Thread):
    """Grammars.warm on a thread of its own. It stops at the next step when the interpreter exits (atexit), so
    that no xgrammar thread is still computing while the process tears down."""

    def __init__(self, grammars: Grammars):
        super().__init__(name="grammar-warm", daemon=True)
        self.grammars, self.stop = grammars, threading.Event()

    def run(self) -> None:
        atexit.register(self.halt)
        try:
            self.grammars.warm(self.grammars.warm_strings, self.stop)
        except Exception:  # noqa: BLE001 - only a cache left cold: bounded strings then compile on first use
            log.warning("warming the bounded-string grammar cache failed", exc_info=True)
        finally:
            atexit.unregister(self.halt)

    def halt(self) -> None:
        self.stop.set()
        self.join()


def _chained(key: GrammarKey) -> str | None:
    """The constraint as EBNF with its bounded strings as shared chains (string_bounds.py), or None: no bounded
    string, or a structural tag that names tokens (its EBNF needs the compiler's vocabulary, so it keeps
    xgrammar's counted form)."""
    import xgrammar as xgr

    try:
        if key.kind == "json_schema":
            grammar = xgr.Grammar.from_json_schema(key.source, any_whitespace=False, strict_mode=True)
        elif key.kind == "structural_tag":
            grammar = xgr.Grammar.from_structural_tag(key.source)
        else:
            return None
    except Exception:  # noqa: BLE001 - the plain compile below gives the caller xgrammar's own error
        return None
    return chain_ebnf(str(grammar))


_local = threading.local()  # per engine thread: a BatchGrammarMatcher (its thread pool) and the mask buffers


def _mask_buffers(rows: int, vocab: int, device: "torch.device") -> tuple:
    """This thread's bitmask for `rows` rows: on the host (pinned where the logits are on the GPU) and its device
    copy, each kept and grown, never allocated per step. A fresh pinned tensor a step costs a page-locking
    allocation (about 1 ms even for one row: the previous one is still tied to the copy queued behind the step),
    so 64 constrained rows took 5 ms a step on the H200. Reusing one buffer is safe: the next fill comes after the
    host has read the tokens the last mask was applied to, so that mask's copy has run."""
    import torch
    import xgrammar as xgr

    key = (vocab, str(device))
    host, dev = getattr(_local, "masks", {}).get(key, (None, None))
    if host is None or host.shape[0] < rows:
        host = xgr.allocate_token_bitmask(max(rows, 64), vocab)
        if device.type == "cuda":
            host = host.pin_memory()
            dev = torch.empty(host.shape, dtype=host.dtype, device=device)
        _local.masks = {**getattr(_local, "masks", {}), key: (host, dev)}
    return host[:rows], (dev[:rows] if dev is not None else None)


def apply_masks(logits: "torch.Tensor", matchers: list) -> None:
    """Mask, in place, every row of `logits` whose matcher (matchers[i], None: unconstrained) forbids a token.
    The bitmask is filled on the host (xgrammar's threads for many rows) and applied on the logits' device."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask, on_device = _mask_buffers(len(matchers), logits.shape[-1], logits.device)
    # xgrammar writes a constrained row whole; only a free row is set to allow all, row by row: one fill over many
    # rows would go to torch's thread pool, which stalled for ms beside xgrammar's busy threads
    for i in set(range(len(matchers))).difference(rows):
        bitmask[i].fill_(-1)
    if len(rows) == 1:
        matchers[rows[0]].fill_next_token_bitmask(bitmask, rows[0])
    else:
        batch = getattr(_local, "batch", None)
        if batch is None:
            batch = _local.batch = xgr.BatchGrammarMatcher()
        batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, rows)
    if logits.is_cuda:  # every row: row indices would be one more copy to the GPU
        on_device.copy_(bitmask, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, on_device, vocab_size=logits.shape[-1])
    else:  # the C++ loop costs per row: only the constrained ones
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)
