"""A request resumed on another replica (failover, issue 16 part 2) gives the client exactly what the uninterrupted
run gives: text held back at the move (a partial UTF-8 character, the start of a possible stop word, a tool call
being written) comes out once, penalties count the output sent before the move, a tool call straddling the move is
the same call. Each move is made as the router makes it: the first request's outputs up to `cut` tokens are what the
client saw, then a fresh request built by failover.continuation and host.resumed goes on. A real engine (the tiny
Llama, SmolLM2's tokenizer), its logits forced to a script by position where the test needs known text. No Ray."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.tokenizer import PreparedPrompt, with_tools
from cluster.messages import Choice, Delta, Job, ToolCall
from cluster.serving.failover import continuation
from cluster.workers.host import resumed


@pytest.fixture(scope="module")
def engine(tiny_models, engine_cache):
    path, _ = tiny_models("llama")
    return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", session_len=512))


class Script:
    """While on, the model writes `text` (then EOS): the logits of the one running request favour the script's
    token at its answer's position (resumed output included), so a resumed request goes on with the script."""

    def __init__(self, engine: LLMEngine, text: str, die_at: int | None = None):
        self.engine, self.die_at = engine, die_at
        tok = engine.tokenizer
        self.ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]

    def __enter__(self) -> "Script":
        real = self.engine.runner.execute

        def execute(step, *args):
            logits = real(step, *args)
            (seq,) = self.engine.seqs.values()
            pos = len(seq.token_ids) - (seq.num_prompt_tokens - seq.num_resumed)
            if pos == self.die_at:
                raise RuntimeError("the device is gone")  # blames no request: the engine's loop ends
            if logits.shape[0] and pos < len(self.ids):
                with torch.inference_mode():
                    logits[0].fill_(0.0)
                    logits[0, self.ids[pos]] = 100.0
            return logits

        self.engine.runner.execute = execute
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.runner.execute


def _run(engine: LLMEngine, prompt: PreparedPrompt, gen: GenerationConfig, stop_after: int | None = None
         ) -> list[Delta]:
    """Each step's output of one request; with `stop_after`, the request is dropped after that many tokens (its
    replica died)."""
    rid = engine.add_request(prompt, gen)
    outs: list[Delta] = []
    while True:
        for o in engine.step():
            outs.append(o)
            if o.finish_reason is not None:
                return outs
            if stop_after is not None and len(outs) == stop_after:
                engine.abort(rid)
                return outs


def _merged(outs: list[Delta]) -> Delta:
    acc = Delta()
    for o in outs:
        acc.merge(o)
    return acc


def answer(engine: LLMEngine, prompt, gen: GenerationConfig, cut: int | None = None) -> Delta:
    """What the client gets, the request moved after `cut` output tokens (None: no move)."""
    prepared = engine.prepare_prompt(with_tools(prompt, gen.tools, gen.tool_choice))
    if cut is None:
        return _merged(_run(engine, prepared, gen))
    before = _run(engine, prepared, gen, stop_after=cut)
    assert before[-1].finish_reason is None, "the answer ended before the move"
    seen = _merged(before)
    job = Job("r", [Choice(0, prompt, gen.model_dump())])
    (choice,) = continuation(job, {0: seen.token_ids}, set(), ["dead"], 1).choices
    rest, cont = resumed(prepared, choice.resume_ids), GenerationConfig(**choice.gen)
    engine.validate(rest, cont)
    return seen.merge(_merged(_run(engine, rest, cont)))


def _cuts_at(engine: LLMEngine, text: str, piece: str) -> list[int]:
    """Numbers of output tokens after which the decoded text ends inside `piece` (a move there straddles it)."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    start = text.index(piece)
    cuts = []
    for k in range(1, len(ids)):
        shown = tok.decode(ids[:k])
        end = len(shown.rstrip("\ufffd"))  # the whole characters; a partial one (U+FFFD) begins there
        if start < end < start + len(piece) or (shown.endswith("\ufffd") and start <= end < start + len(piece)):
            cuts.append(k)
    assert cuts, piece
    return cuts


SCRIPT = "Hello 上海是中国 END NOT 🚀 world END NOW tail"


def test_text_held_back_at_the_move_reaches_the_client_once(engine):
    """A move inside a multi-byte character (海, 🚀: byte tokens) and inside a possible stop word ("END NO",
    held back until "T" shows it is not "END NOW"): the streamed text is the uninterrupted run's, which stops
    before the real stop word."""
    g = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_words=["END NOW"])
    with Script(engine, SCRIPT):
        whole = answer(engine, "Say it", g)
        assert whole.text == "Hello 上海是中国 END NOT 🚀 world " and whole.finish_reason == "stop"
        cuts = sorted({c for piece in ("海", "🚀", "END NOT") for c in _cuts_at(engine, SCRIPT, piece)})
        assert len(cuts) >= 4
        for cut in cuts:
            moved = answer(engine, "Say it", g, cut)
            assert (moved.text, moved.finish_reason, moved.token_ids) == (whole.text, "stop", whole.token_ids), cut


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CALLS = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')


def _calls(d: Delta) -> list[tuple[int, str, str]]:
    return [(c.index, c.name, c.arguments) for c in d.tool_calls or []]


def test_a_tool_call_straddling_the_move_is_the_same_call(engine):
    """Moves inside the first call's marker, inside its JSON, between the two calls and inside the second: the
    same content (the newline between the calls is content), the same two calls (indexes 0 and 1, the same arguments), finish_reason tool_calls."""
    g = GenerationConfig(max_new_tokens=80, temperature=0.0, tools=TOOLS)
    ask = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
    with Script(engine, CALLS):
        whole = answer(engine, ask, g)
        assert _calls(whole) == [(0, "get_weather", '{"city": "Paris"}'), (1, "get_weather", '{"city": "Lyon"}')]
        assert whole.text == "Let me check.\n" and whole.finish_reason == "tool_calls"
        first = _cuts_at(engine, CALLS, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
        cuts = [_cuts_at(engine, CALLS, "<tool_call>")[1], first[0], first[-1],
                _cuts_at(engine, CALLS, "</tool_call>\n<tool_call>")[-1], _cuts_at(engine, CALLS, "Lyon")[0] - 2]
        for cut in cuts:
            moved = answer(engine, ask, g, cut)
            assert (moved.text, _calls(moved), moved.finish_reason) == (whole.text, _calls(whole), "tool_calls"), cut


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 1.5, "frequency_penalty": 1.0},
    {"repetition_penalty": 1.5},
    {"frequency_penalty": 2.0, "min_new_tokens": 12},
], ids=["presence+frequency", "repetition", "min_tokens"])
def test_penalties_count_the_output_sent_before_the_move(engine, extra):
    """Greedy and penalised: the same tokens with and without a move, at any point."""
    g = GenerationConfig(max_new_tokens=16, temperature=0.0, **extra)
    prompt = "The quick brown fox jumps over the lazy dog because"
    whole = answer(engine, prompt, g).token_ids
    plain = g.model_copy(update={k: GenerationConfig.model_fields[k].default for k in extra})
    assert whole != answer(engine, prompt, plain).token_ids  # the penalties matter
    for cut in (3, 8, 13):
        assert answer(engine, prompt, g, cut).token_ids == whole, cut


def test_min_tokens_hold_across_the_move(engine):
    """The answer's stop token is masked until min_tokens counts the output before the move too."""
    with Script(engine, "Hi there"):  # then EOS, masked until 6 tokens
        g = GenerationConfig(max_new_tokens=10, temperature=0.0, min_new_tokens=6)
        whole = answer(engine, "Say hi", g)
        assert len(whole.token_ids) >= 6
        for cut in (1, 2, 4):
            assert answer(engine, "Say hi", g, cut).token_ids == whole.token_ids, cut


def test_a_resumed_prompt_keeps_its_own_template_ending(engine):
    """A reasoning template's prompt ends in <think> (the answer opens inside the block): resumed with output
    appended, the prompt's own ending still decides, so the reasoning parser starts in the same state."""
    tok = engine.tokenizer
    ids = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    p = PreparedPrompt(ids, chat=True)
    sent = tok.encode("Some thought", add_special_tokens=False)
    r = resumed(p, sent)
    assert (r.token_ids, r.resumed, r.own_ids, r.chat) == (ids + sent, len(sent), ids, True)
    tok.__dict__["thinks"] = True  # as a template with </think> would say
    try:
        assert tok.think_state(r) == tok.think_state(p) == "opened"
    finally:
        del tok.__dict__["thinks"]


def test_a_structured_answer_moved_midway_keeps_its_grammar_state(engine):
    """guided_json: the new replica's matcher has accepted the sent tokens, so the rest of the object is what the
    uninterrupted run writes (a fresh matcher would demand a new '{' and refuse the script's next token)."""
    pytest.importorskip("xgrammar")
    g = GenerationConfig(max_new_tokens=30, temperature=0.0, guided_json={
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    with Script(engine, '{"city": "Paris"}'):
        whole = answer(engine, "City?", g)
        assert whole.text == '{"city": "Paris"}' and whole.finish_reason == "stop"
        for cut in (2, len(whole.token_ids) - 2):
            moved = answer(engine, "City?", g, cut)
            assert (moved.text, moved.token_ids) == (whole.text, whole.token_ids), cut


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["stop word", "tool calls"])
async def test_the_router_moves_a_stream_whose_engine_dies_with_text_held_back(engine, tiny_models, engine_cache,
                                                                               case):
    """End to end: the router's OpenAIServer over two replicas of real engines; "a"'s engine dies right after
    the stream's text is held back (inside "END NO", or inside the first tool call): the SSE stream goes on on
    "b" and is the uninterrupted run's, usage included."""
    from test_failover import TwoReplicas, core, sse_of

    from cluster.engine.async_engine import AsyncEngine
    from cluster.serving.server import OpenAIServer

    chat = case == "tool calls"
    script = CALLS if chat else SCRIPT
    g = GenerationConfig(max_new_tokens=80, temperature=0.0, **({"tools": TOOLS} if chat else
                                                                  {"stop_words": ["END NOW"]}))
    prompt = [{"role": "user", "content": "Weather in Paris and Lyon?"}] if chat else "Say it"
    with Script(engine, script):
        whole = answer(engine, prompt, g)
    die_at = _cuts_at(engine, script, '"Paris"' if chat else "END NOT")[-1]
    path, _ = tiny_models("llama")
    ea, eb = (AsyncEngine(LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", session_len=512)))
              for _ in range(2))
    try:
        with Script(ea.engine, script, die_at), Script(eb.engine, script):
            backend = TwoReplicas([await core(ea, "a"), await core(eb, "b")])
            server = OpenAIServer([backend])
            body = {"model": "fake", "max_tokens": 80, "stream": True, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            body.update({"messages": prompt, "tools": TOOLS} if chat else {"prompt": prompt, "stop": ["END NOW"]})
            _, gen = await server.completion(json.dumps(body).encode(), chat=chat)
            chunks = await asyncio.wait_for(sse_of(gen), 60)
    finally:
        ea.shutdown(), eb.shutdown()
    assert backend.sent_to == ["a", "b"] and not any("error" in c for c in chunks), chunks[-2:]
    got = Delta()
    for c in chunks:
        for ch in c["choices"]:
            d = ch["delta"] if chat else {"content": ch["text"]}
            calls = [ToolCall(t["index"], t["function"]["name"], t["function"]["arguments"], t["id"])
                     for t in d.get("tool_calls") or []]
            got.merge(Delta(d.get("content") or "", finish_reason=ch["finish_reason"], tool_calls=calls or None))
    assert (got.text, _calls(got), got.finish_reason) == (whole.text, _calls(whole), whole.finish_reason)
    assert chunks[-1]["usage"]["completion_tokens"] == len(whole.token_ids)
