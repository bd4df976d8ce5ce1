"""Tool calling and reasoning content: the parsers of each family's format (two calls, calls split across stream
chunks, malformed output), the grammar of a forced tool_choice for each format, and end to end a tiny random
Qwen2 with a Qwen2.5-style template behind the real router app (uvicorn, test_api_fuzz's ServerThread), through
the openai SDK: forced calls whose arguments validate, streamed deltas, a round trip with a `tool` message, and the
400s of bad tools."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from cluster.messages import Delta, ToolCall
from cluster.tool_parsers import FORMATS, OutputParser, ReasoningParser, ToolCallParser, detect_format

QWEN25_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


def _feed(parser, text: str, step: int = 1):
    """Text in pieces of `step` characters (a stream), then the end; (content, calls)."""
    content, calls = "", []
    for i in range(0, len(text), step):
        c, got = parser.feed(text[i:i + step])
        content, calls = content + c, calls + got
    c, got = parser.feed("", final=True)
    return content + c, calls + got


CALL_A = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 2}}
CALL_B = {"name": "get_time", "arguments": {"zone": "UTC"}}


def _render(fmt_name: str, calls: list[dict]) -> str:
    fmt = FORMATS[fmt_name]
    return fmt.render([(c["name"], c["arguments"]) for c in calls])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_two_calls_in_each_format_split_anyhow(fmt, step):
    prefix = "" if fmt == "llama3_json" else "Let me check. "
    content, calls = _feed(ToolCallParser(FORMATS[fmt]), prefix + _render(fmt, [CALL_A, CALL_B]), step)
    assert content.strip() == prefix.strip()
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", CALL_A["arguments"]), (1, "get_time", CALL_B["arguments"])]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("fmt, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call> done'),
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("hermes", "a <tool_call" + "> cut"),  # unclosed, not JSON
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa'),  # cut by max_tokens
    ("llama3_json", '{"answer": 42}'),  # JSON, but not a call
    ("internlm2", "<|action_start|><|interpreter|>\nprint(1)<|action_end|>"),  # code, not a plugin call
])
def test_malformed_calls_stay_content(fmt, text):
    content, calls = _feed(ToolCallParser(FORMATS[fmt]), text, 2)
    assert calls == [] and content == text


@pytest.mark.parametrize("fmt", ["mistral", "mistral_v11"])
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_mistral_formats_parse_both_shapes(fmt, step):
    """Either Mistral format reads v0.3's JSON list and v11's name[ARGS]{...} (with or without [CALL_ID])."""
    old = _render("mistral", [CALL_A, CALL_B])
    new = ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris", "unit": "c", "days": 2}'
           '[TOOL_CALLS]get_time[ARGS] {"zone": "UTC"}')
    for text in (old, new):
        content, calls = _feed(ToolCallParser(FORMATS[fmt]), text, step)
        assert content == "" and [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
            (0, "get_weather", CALL_A["arguments"]), (1, "get_time", CALL_B["arguments"])]
    _, calls = _feed(ToolCallParser(FORMATS[fmt]), new, step)
    assert calls[0].id == "a1B2c3D4e" and calls[1].id.startswith("call_")


def test_mistral_v11_call_goes_out_once_its_arguments_close():
    p = ToolCallParser(FORMATS["mistral_v11"])
    assert p.feed('Sure. [TOOL_CALLS]get_time[ARGS]{"zone": ') == ("Sure. ", [])
    content, calls = p.feed('"UTC"}[TOOL_CA')
    assert content == "" and [c.name for c in calls] == ["get_time"]
    content, calls = p.feed('LLS]get_weather[ARGS]{"city": "Oslo", "unit": "f", "days": 1}')
    assert [c.index for c in calls] == [1] and json.loads(calls[0].arguments)["city"] == "Oslo"
    assert p.feed("", final=True) == ("", [])


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa',  # cut by max_tokens
    "[TOOL_CALLS]get_weather and then nothing",  # no [ARGS]
    '[TOOL_CALLS]two words[ARGS]{"x": 1}',  # not a function name
    "[TOOL_CALLS]f[ARGS][1, 2]",  # arguments that are no object
])
def test_malformed_mistral_v11_calls_stay_content(text):
    content, calls = _feed(ToolCallParser(FORMATS["mistral_v11"]), text, 2)
    assert calls == [] and content == text


def test_plain_text_streams_out_with_only_a_possible_marker_held_back():
    p = ToolCallParser(FORMATS["hermes"])
    assert p.feed("Hello <tool") == ("Hello ", [])
    assert p.feed("s are fun") == ("<tools are fun", [])
    assert p.feed("", final=True) == ("", [])
    p = ToolCallParser(FORMATS["llama3_json"])
    assert p.feed("  ") == ("", []) and p.feed("Sure") == ("  Sure", [])


def test_arguments_given_as_json_text_and_parameters_key():
    text = '<tool_call>{"name": "f", "parameters": "{\\"x\\": 1}"}</tool_call>'
    _, calls = _feed(ToolCallParser(FORMATS["hermes"]), text)
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 1}


@pytest.mark.parametrize("opened, text, reasoning, content", [
    (False, "<think>\nsteps\n</think>\n\nThe answer.", "steps\n", "The answer."),
    (False, "No thinking here.", "", "No thinking here."),
    (True, "steps here</think>Answer", "steps here", "Answer"),
    (True, "cut mid-thought", "cut mid-thought", ""),
    (False, "  <thinking is a word", "", "  <thinking is a word"),
])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_reasoning_is_split_from_content(opened, text, reasoning, content, step):
    p, r, c = ReasoningParser(opened), "", ""
    for i in range(0, len(text), step):
        a, b = p.feed(text[i:i + step])
        r, c = r + a, c + b
    a, b = p.feed("", final=True)
    assert (r + a, c + b) == (reasoning, content)


def test_reasoning_then_tool_calls():
    text = "<think>need weather</think>\n" + _render("hermes", [CALL_A])
    content, reasoning, calls = OutputParser(FORMATS["hermes"], reasoning=True).parse(text)
    assert (content.strip(), reasoning, [c.name for c in calls]) == ("", "need weather", ["get_weather"])


def test_formats_are_detected_from_template_or_vocabulary():
    assert detect_format(QWEN25_TEMPLATE).name == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert detect_format("{{ '[TOOL_CALLS]' + name + '[ARGS]' + args }}").name == "mistral_v11"
    assert detect_format(None, {"[TOOL_CALLS]": 5, "[ARGS]": 32}).name == "mistral_v11"
    assert detect_format(None, {"<|action_start|>": 1}).name == "internlm2"
    assert detect_format("{{ '<|python_tag|>' }}").name == "llama3_json"
    assert detect_format("plain").name == "hermes"


def test_delta_merge_folds_tool_calls_and_reasoning():
    acc = Delta("a", reasoning="r1")
    acc.merge(Delta("", reasoning="r2", tool_calls=[ToolCall(0, "f", '{"x"', "call_1")]))
    acc.merge(Delta("", tool_calls=[ToolCall(0, "", ": 1}"), ToolCall(1, "g", "{}", "call_2")]))
    assert acc.reasoning == "r1r2"
    assert [(c.index, c.name, c.arguments, c.id) for c in acc.tool_calls] == [
        (0, "f", '{"x": 1}', "call_1"), (1, "g", "{}", "call_2")]


# -- the grammar of a forced tool_choice ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammars(default_model_dir):
    pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    from cluster.engine.grammar import Grammars

    return Grammars(AutoTokenizer.from_pretrained(str(default_model_dir)), 49152)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_forced_calls_grammar_accepts_the_format_and_only_valid_arguments(grammars, fmt):
    import xgrammar as xgr

    from cluster.config import GenerationConfig
    from cluster.engine.grammar import GrammarKey, _tag, tool_calls_format

    def accepts(gen, text: str) -> bool:
        key = GrammarKey("structural_tag", _tag(tool_calls_format(gen, FORMATS[fmt])), "tools")
        m = xgr.GrammarMatcher(grammars.get(key))
        return m.accept_string(text) and m.is_completed()

    required = GenerationConfig(tools=TOOLS, tool_choice="required")
    named = GenerationConfig(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert accepts(required, _render(fmt, [CALL_A]))
    assert accepts(required, _render(fmt, [CALL_A, CALL_B]))  # parallel_tool_calls: more than one
    assert not accepts(required.model_copy(update={"parallel_tool_calls": False}), _render(fmt, [CALL_A, CALL_B]))
    assert accepts(named, _render(fmt, [CALL_B])) and not accepts(named, _render(fmt, [CALL_A]))
    bad = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin", "days": 2}}
    assert not accepts(required, _render(fmt, [bad]))
    assert not accepts(required, "Just text.")


# -- end to end: a tiny Qwen2 with a Qwen2.5-style template ---------------------------------------------------------
THINK_TEMPLATE = (  # DeepSeek-R1's way, in ChatML: the generation prompt opens the reasoning block
    "{%- for m in messages %}{%- set content = m.content.split('</think>')[-1] %}"
    "{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}")


def _templated(tiny_models, tmp_path_factory, template: str):
    """The tiny Qwen2 with `template` as its chat template, in a folder of its own."""
    src, _ = tiny_models("qwen2")
    path = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(src, path)
    (path / "chat_template.jinja").write_text(template)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def _serve(tiny_models, engine_cache, tmp_path_factory, template: str):
    """A server over the tiny Qwen2 with `template` as its chat template, for a module fixture to yield."""
    pytest.importorskip("xgrammar")
    pytest.importorskip("openai")
    from test_api_fuzz import ServerThread

    from cluster.config import EngineConfig
    from cluster.engine.async_engine import AsyncEngine
    from cluster.engine.engine import LLMEngine

    path = _templated(tiny_models, tmp_path_factory, template)
    engine = AsyncEngine(LLMEngine(str(path), EngineConfig(device="cpu", dtype="float32", session_len=512,
                                                           num_blocks=256, max_batch_size=8, cache_dir=engine_cache)))
    srv = ServerThread(engine)
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def qwen_server(tiny_models, engine_cache, tmp_path_factory):
    yield from _serve(tiny_models, engine_cache, tmp_path_factory, QWEN25_TEMPLATE)


class Scripted:
    """The model says `text` (then EOS): each step's logits favour the script's next token, and the sampler, the
    grammar's mask, the detokenizer and the parsers run as ever. For one request at a time, greedy."""

    def __init__(self, server, text: str):
        self.llm = server.engine.engine
        tok = self.llm.tokenizer
        self.ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        self.k = 0

    def __enter__(self):
        runner, real = self.llm.runner, self.llm.runner.execute

        def execute(step, *args):
            import torch

            logits = real(step, *args)
            if self.k < len(self.ids):
                with torch.inference_mode():
                    logits[0].fill_(0.0)
                    logits[0, self.ids[self.k]] = 100.0
                self.k += 1
            return logits

        runner.execute = execute
        return self

    def __exit__(self, *exc):
        del self.llm.runner.execute


@pytest.fixture(scope="module")
def sdk(qwen_server):
    import openai

    from test_api_fuzz import KEY

    return openai.OpenAI(base_url=qwen_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _valid(calls) -> None:
    import jsonschema

    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_the_template_renders_tools_and_history(qwen_server):
    from cluster.engine.tokenizer import ChatPrompt

    tok = qwen_server.engine.tokenizer
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_A["arguments"]}}]},
                     {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}]
    text = tok.decode(tok.prompt_ids(ChatPrompt(history, TOOLS)), skip_special_tokens=False)
    assert '"name": "get_weather"' in text and "<tools>" in text and "<tool_response>\nsunny, 21 C" in text
    assert tok.tool_format.name == "hermes"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_gives_calls_whose_arguments_validate(sdk, choice):
    r = sdk.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, n=2,
                                    parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=80)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        _valid(c.message.tool_calls)
        assert len(c.message.tool_calls) == 1
        if isinstance(choice, dict):
            assert c.message.tool_calls[0].function.name == "get_weather"


def test_streamed_tool_call_deltas_reassemble(sdk):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_tokens=80)
    whole = sdk.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in sdk.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += d.id or ""
                acc["name"] += d.function.name or ""
                acc["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)


def test_a_round_trip_with_a_tool_message(sdk):
    first = sdk.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = sdk.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = sdk.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("patch, param, contains", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integr"}}}}}]}, "tools.0.function.parameters", "not a valid JSON Schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "share a name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}], "tools": TOOLS}, None, "only assistant"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages", "not valid JSON"),
])
def test_bad_tools_are_400_with_an_openai_body(qwen_server, patch, param, contains):
    from test_api_fuzz import AUTH

    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **patch}
    r = httpx.post(qwen_server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and contains in err["message"], err
    if param:
        assert err["param"] == param, err


def test_auto_tool_choice_parses_what_the_model_writes(qwen_server, sdk):
    said = "Checking. " + _render("hermes", [CALL_A, CALL_B])
    with Scripted(qwen_server, said):
        r = sdk.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content.strip() == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
        ("get_weather", CALL_A["arguments"]), ("get_time", CALL_B["arguments"])]
    with Scripted(qwen_server, said):
        r = sdk.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=120)  # no tools
    assert r.choices[0].finish_reason == "stop" and "<tool_call>" in r.choices[0].message.content


@pytest.fixture(scope="module")
def think_server(tiny_models, engine_cache, tmp_path_factory):
    yield from _serve(tiny_models, engine_cache, tmp_path_factory, THINK_TEMPLATE)


def test_reasoning_content_apart_from_content_streamed_or_not(think_server):
    import openai

    from test_api_fuzz import KEY

    sdk = openai.OpenAI(base_url=think_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    said = "The user wants a greeting.</think>\n\nHello there!"
    with Scripted(think_server, said):
        m = sdk.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=60).choices[0].message
    assert (m.model_extra["reasoning_content"], m.content) == ("The user wants a greeting.", "Hello there!")
    reasoning = content = ""
    with Scripted(think_server, said):
        for chunk in sdk.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=60,
                                                 stream=True):
            d = chunk.choices[0].delta if chunk.choices else None
            reasoning += (d.model_extra or {}).get("reasoning_content") or "" if d else ""
            content += d.content or "" if d else ""
    assert (reasoning, content) == ("The user wants a greeting.", "Hello there!")
    with Scripted(think_server, "Short: no.</think>yes"):  # the constraint starts after the reasoning block
        m = sdk.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=60,
                                        extra_body={"guided_choice": ["yes", "no"]}).choices[0].message
    assert (m.model_extra["reasoning_content"], m.content) == ("Short: no.", "yes")


# -- Pipeline.chat keeps tool calls -------------------------------------------------------------------------------
def test_pipeline_chat_keeps_tool_calls_and_answers_a_tool_result(tiny_models, engine_cache, tmp_path_factory):
    pytest.importorskip("xgrammar")
    from cluster.api import Pipeline
    from cluster.config import EngineConfig, GenerationConfig
    from cluster.engine.tokenizer import ChatPrompt

    path = _templated(tiny_models, tmp_path_factory, QWEN25_TEMPLATE)
    gen = GenerationConfig(max_new_tokens=200, temperature=1.0, seed=3, tools=TOOLS,
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    with Pipeline(str(path), EngineConfig(device="cpu", dtype="float32", session_len=512, num_blocks=128,
                                          max_batch_size=4, cache_dir=engine_cache)) as pipe:
        session = pipe.chat(ASK[0]["content"], gen_config=gen)
        last = session.messages[-1]
        assert session.response.finish_reason == "tool_calls" and [c.name for c in session.response.tool_calls] == [
            "get_weather"]
        (call,) = last["tool_calls"]
        assert last["role"] == "assistant" and call["id"] == session.response.tool_calls[0].id
        assert call["function"]["arguments"] == json.loads(session.response.tool_calls[0].arguments)  # an object
        with pytest.raises(ValueError, match="no tool call 'call_nope'"):
            session.add_tool_result("call_nope", "?")
        with pytest.raises(ValueError, match="add_tool_result"):
            pipe.chat(None, session, gen)
        session.add_tool_result(call["id"], "sunny, 21 C")
        tok = pipe.tokenizer
        text = tok.decode(tok.prompt_ids(ChatPrompt(session.messages, TOOLS)), skip_special_tokens=False)
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in text
        assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
        follow = GenerationConfig(max_new_tokens=8, temperature=0, tools=TOOLS, tool_choice="none")
        pieces = list(pipe.chat(None, session, follow, stream=True))
        assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
        assert session.messages[-1]["content"] == "".join(pieces) and session.response.finish_reason
