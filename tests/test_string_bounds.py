"""Bounded JSON strings as shared rule chains (cluster/engine/string_bounds.py): the same strings pass as under
xgrammar's own counted repetition, token masks respect the bound, large bounds keep xgrammar's form, and the
background warm-up stops when asked. A tiny vocabulary keeps each compile to milliseconds."""
from __future__ import annotations

import json
import random
import threading

import pytest

xgr = pytest.importorskip("xgrammar")

from cluster.engine.grammar import GrammarKey, Grammars, _chained, _Warmer  # noqa: E402
from cluster.engine.string_bounds import CHAIN_MAX, chain_ebnf, warm_ebnf  # noqa: E402

VOCAB = ["a", "b", "ab", "abc", '"', '",', '"}', "}", "{", "[", "]", ",", ", ", ":", ": ", "\\", "n", "é", "\n",
         '{"', 'x"', "x", "</s>"]
SCHEMAS = [
    {"type": "string", "maxLength": 3},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "minLength": 3},
    {"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 3},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 2},
                                      "b": {"type": "string", "maxLength": 0}}, "required": ["a", "b"]},
    {"type": "object", "propertyNames": {"maxLength": 2}, "additionalProperties": {"type": "integer"}},
]


@pytest.fixture(scope="module")
def compiler():
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[len(VOCAB) - 1])
    return xgr.GrammarCompiler(info, max_threads=1)


def _accepts(compiled, text: str) -> bool:
    m = xgr.GrammarMatcher(compiled)
    return m.accept_string(text) and m.is_completed()


def _texts(rng: random.Random) -> list[str]:
    s = "".join(rng.choice('ab"\\é\nx') for _ in range(rng.randint(0, 6)))
    return [json.dumps(s, ensure_ascii=False), f'"{s}"', json.dumps([s, s[:1]], ensure_ascii=False),
            json.dumps({"a": s, "b": ""}, ensure_ascii=False),
            json.dumps({s: 1}, ensure_ascii=False)]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:60])
def test_chain_accepts_exactly_what_the_counted_form_does(compiler, schema):
    src = json.dumps(schema)
    counted = compiler.compile_json_schema(src, any_whitespace=False, strict_mode=True)
    ebnf = chain_ebnf(str(xgr.Grammar.from_json_schema(src, any_whitespace=False, strict_mode=True)))
    assert ebnf and ("jstr_le" in ebnf or "jstr_ge" in ebnf)
    chained = compiler.compile_grammar(ebnf)
    rng, seen = random.Random(0), {True: 0, False: 0}
    for _ in range(200):
        for text in _texts(rng):
            want = _accepts(counted, text)
            assert _accepts(chained, text) == want, text
            seen[want] += 1
    assert seen[True] and seen[False]  # the comparison had both kinds of text


def test_token_masks_hold_the_bound(compiler):
    """After `"ab` under maxLength 3, `a` may come but `ab` and `abc` may not; `"` closes."""
    src = json.dumps({"type": "string", "maxLength": 3})
    compiled = compiler.compile_grammar(chain_ebnf(str(xgr.Grammar.from_json_schema(src, any_whitespace=False))))
    m = xgr.GrammarMatcher(compiled)
    assert m.accept_string('"ab')
    mask = xgr.allocate_token_bitmask(1, len(VOCAB))
    m.fill_next_token_bitmask(mask)
    allowed = {VOCAB[i] for i in range(len(VOCAB)) if mask[0, i // 32] >> (i % 32) & 1}
    assert {"a", "b", '"', "x", "é", 'x"'} <= allowed
    assert not allowed & {"ab", "abc", "\\", "\n"}


def test_bounds_above_the_chain_stay_counted():
    src = json.dumps({"type": "string", "maxLength": CHAIN_MAX + 1})
    assert chain_ebnf(str(xgr.Grammar.from_json_schema(src, any_whitespace=False))) is None
    src = json.dumps({"type": "string", "minLength": 1, "maxLength": CHAIN_MAX})
    assert "jstr_le512_ge1" in chain_ebnf(str(xgr.Grammar.from_json_schema(src, any_whitespace=False)))


def test_schemas_without_bounds_and_token_tags_are_left_alone():
    assert _chained(GrammarKey("json_schema", '{"type": "string"}')) is None
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "token", "token": "</s>"},
        {"type": "json_schema", "json_schema": {"type": "string", "maxLength": 2}}]}}
    assert _chained(GrammarKey("structural_tag", json.dumps(tag))) is None  # needs the vocabulary: counted
    tag["format"]["elements"][0] = {"type": "const_string", "value": "<x>"}
    assert "jstr_le2" in _chained(GrammarKey("structural_tag", json.dumps(tag)))


def test_warm_grammar_holds_every_shorter_bound():
    text = warm_ebnf(20)
    assert all(f"jstr_le{n} ::=" in text for n in range(21))
    xgr.Grammar.from_ebnf(text)


class _Tok:
    """What Grammars needs of a Hugging Face tokenizer (the tiny vocabulary)."""

    added_tokens_decoder: dict = {}


def test_the_warmer_stops_between_steps(monkeypatch):
    info = xgr.TokenizerInfo(VOCAB)
    monkeypatch.setattr(xgr.TokenizerInfo, "from_huggingface", staticmethod(lambda *a, **k: info))
    g = Grammars(_Tok(), len(VOCAB), warm_strings=0)
    started, calls = threading.Event(), []
    compiler = g._get_compiler()

    class Slow:
        def compile_grammar(self, text):
            calls.append(text)
            started.set()
            return compiler.compile_grammar(text)

    monkeypatch.setattr(g, "_get_compiler", lambda: Slow())
    g.warm_strings = 10_000
    w = _Warmer(g)
    w.start()
    assert started.wait(10)
    w.halt()
    assert not w.is_alive() and len(calls) < 10_000 // 16
    g.warm_strings = 40
    g.warm(40)
    assert g.get(GrammarKey("json_schema", json.dumps({"type": "string", "maxLength": 33}))) is not None
