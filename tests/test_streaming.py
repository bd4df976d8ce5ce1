"""Streaming text: never broken UTF-8, never a leaked stop word, reassembles to the non-streamed text."""
from cluster import GenerationConfig
from cluster.engine.tokenizer import IncrementalDetokenizer, Tokenizer


def test_chinese_and_emoji_stream_reassembles(default_model_dir):
    tok = Tokenizer(default_model_dir)
    text = "上海是中国最大的城市之一 🚀🌏 très café 東京"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, [])
    pieces = []
    for t in ids:
        d.add(t)
        piece = d.take()
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(d.take(final=True))
    assert "".join(pieces) == tok.decode(ids)
    assert sum(1 for p in pieces if p) > 5  # it really streamed


def test_stop_word_prefix_is_held_back(default_model_dir):
    tok = Tokenizer(default_model_dir)
    ids = tok.encode("Hello world. STOP here please", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, ["STOP"])
    shown = ""
    for t in ids:
        d.add(t)
        shown += d.take()
        if d.stopped:
            break
    shown += d.take(final=True)
    assert d.stopped
    assert shown == "Hello world. "


def test_pipeline_stream_equals_batch(default_model_dir):
    from cluster import pipeline

    pipe = pipeline(cache_dir=None, device="cpu")
    try:
        g = GenerationConfig(max_new_tokens=24, temperature=0)
        whole = pipe(["上海是", "Tell me a joke"], g)
        streamed = ["", ""]
        finish = [None, None]
        for chunk in pipe.stream_infer(["上海是", "Tell me a joke"], g):
            assert "\ufffd" not in chunk.text
            streamed[chunk.index] += chunk.text
            finish[chunk.index] = chunk.finish_reason or finish[chunk.index]
        assert streamed == [r.text for r in whole]
        assert all(f in ("stop", "length") for f in finish)
        assert any("\u4e00" <= c <= "\u9fff" for c in whole[0].text)  # the Chinese prompt got Chinese text
        st = pipe.engine.stats()
        assert st["kv_blocks_free"] == st["kv_blocks_total"]
    finally:
        pipe.close()


def test_pipeline_session_keeps_history(default_model_dir):
    from cluster import pipeline

    with pipeline(device="cpu") as pipe:
        g = GenerationConfig(max_new_tokens=16, temperature=0)
        s = pipe.chat("My name is Bob.", gen_config=g)
        s = pipe.chat("What is my name?", s, gen_config=g)
        assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
        assert s.response.cached_token_len > 0  # the first turn's KV was reused
        first_answer = s.messages[1]["content"]
        assert first_answer and s.response.input_token_len > len(pipe.tokenizer.encode(first_answer))


def test_an_answer_cut_mid_character_by_max_tokens_ends_cleanly(default_model_dir):
    """A Chinese answer cut by max_new_tokens in the middle of a character's bytes: its text drops the incomplete
    bytes instead of ending in U+FFFD, and the streamed pieces add up to it."""
    from cluster import EngineConfig
    from cluster.engine.engine import LLMEngine

    engine = LLMEngine(str(default_model_dir), EngineConfig(device="cpu", session_len=256, max_batch_size=8))
    prompts = ["上海是", [{"role": "user", "content": "请用中文介绍一下上海。"}]]
    rids = {engine.add_request(p, GenerationConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)): p
            for p in prompts for n in range(1, 9)}
    pieces: dict[str, list[str]] = {rid: [] for rid in rids}
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            pieces[out.request_id].append(out.text)
            tokens[out.request_id] += out.token_ids
    cut = 0
    for rid in rids:
        text, raw = "".join(pieces[rid]), engine.tokenizer.decode(tokens[rid])
        assert all("\ufffd" not in p for p in pieces[rid]), pieces[rid]
        assert text == raw.rstrip("\ufffd") and text, (text, raw)
        cut += raw.endswith("\ufffd")
    assert cut >= 2  # some answers really were cut inside a character
