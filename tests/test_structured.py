"""Structured output end to end: the embedded SmolLM2 (fp32, CPU) behind the real router app, replica core and
rank-0 host (uvicorn on the loopback, tests/test_api_fuzz.py's ServerThread), through the openai SDK.

Twenty JSON schemas (nested objects, enums, arrays, numbers with bounds, $ref, nullable) answered concurrently;
the SDK's parse() with a pydantic model (and langchain-openai's with_structured_output, when installed); streamed
chunks that reassemble to the non-streamed JSON (n = 2); vLLM's guided_* on both endpoints; the pipeline's
GenerationConfig (a forced tool call on SmolLM2, whose template knows no tools); overlapped steps beside a
constrained request; and the 400s of bad constraints."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
from pydantic import BaseModel, Field  # noqa: E402
from test_api_fuzz import AUTH, KEY, ServerThread  # noqa: E402

from cluster.api import Pipeline  # noqa: E402
from cluster.config import EngineConfig, GenerationConfig  # noqa: E402

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer",
     "minimum": 1, "maximum": 999}, "name": S}, "required": ["id", "name"]}}, "required": ["user"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": -10,
                                                                       "maximum": 10}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object",
     "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"note": {"anyOf": [S, {"type": "null"}]}}, "required": ["note"]},
    {"type": "object", "properties": {"city": S, "country": {"enum": ["FR", "DE", "IT"]}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"temp": {"type": "number", "exclusiveMinimum": -50, "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temp", "unit"]},
    {"$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": S},
                       "required": ["kind", "name"]}},
     "type": "object", "properties": {"pet": {"$ref": "#/$defs/pet"}}, "required": ["pet"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"flags": {"type": "object", "properties": {"a": {"type": "boolean"},
                                                                                  "b": {"type": "boolean"}},
                                                "required": ["a", "b"]}}, "required": ["flags"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "month": {"type": "integer", "minimum": 1, "maximum": 12}},
     "required": ["year", "month"]},
    {"type": "object", "properties": {"title": S, "authors": {"type": "array", "items": S, "maxItems": 2},
                                      "pages": {"type": "integer", "minimum": 1, "maximum": 2000}},
     "required": ["title", "authors", "pages"]},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "meta": {"type": "object",
     "properties": {"priority": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["priority"]}},
     "required": ["status", "meta"]},
]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def pipe(default_model_dir):
    p = Pipeline(str(default_model_dir), EngineConfig(device="cpu", dtype="float32", session_len=512,
                                                      num_blocks=512, max_batch_size=32))
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pipe):
    srv = ServerThread(pipe.engine)  # the pipeline's AsyncEngine: one model load for both
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, schema: dict, **kw):
    kw = {"temperature": 0, "max_tokens": 60, **kw}
    return client.chat.completions.create(
        model="tiny", messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        **kw)


def test_twenty_schemas_each_answer_validates(client):
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # concurrent: the engine batches them
        answers = list(pool.map(lambda s: _ask(client, s), SCHEMAS))
    for schema, r in zip(SCHEMAS, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


class Address(BaseModel):
    city: str = Field(max_length=8)


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]
    home: Optional[Address]


def test_sdk_parse_and_langchain_structured_output_with_a_pydantic_model(client, server):
    """The SDK's parse(), and langchain-openai's with_structured_output (json_schema) when it is installed."""
    calls = [lambda: client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Make up a person."}], response_format=Person,
        temperature=0, max_tokens=80).choices[0].message.parsed]
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        ChatOpenAI = None
    if ChatOpenAI is not None:
        llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key=KEY, temperature=0, max_tokens=80,
                         max_retries=0)
        calls.append(lambda: llm.with_structured_output(Person, method="json_schema").invoke("Make up a person."))
    for person in _both(*calls):
        assert isinstance(person, Person) and (person.home is None or isinstance(person.home, Address))


def _both(*calls):
    """Run the calls concurrently (the engine batches them); their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def test_streamed_chunks_reassemble_to_the_same_json(client):
    schema = SCHEMAS[6]

    def streamed():
        parts: dict[int, str] = {0: "", 1: ""}
        finish = {}
        for chunk in _ask(client, schema, n=2, seed=5, temperature=0.8, stream=True):
            for c in chunk.choices:
                parts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish.get(c.index)
        return parts, finish

    whole, (parts, finish) = _both(lambda: _ask(client, schema, n=2, seed=5, temperature=0.8), streamed)
    for c in whole.choices:
        assert parts[c.index] == c.message.content and finish[c.index] == "stop"
        jsonschema.validate(json.loads(parts[c.index]), schema)


def test_json_object_and_guided_params_on_both_endpoints(client):
    chat, completions = client.chat.completions.create, client.completions.create
    obj, choice, regex, ebnf, guided = _both(
        lambda: chat(model="tiny", messages=[{"role": "user", "content": "Give a JSON object with one key."}],
                     temperature=0, max_tokens=40, response_format={"type": "json_object"}),
        lambda: completions(model="tiny", prompt="Is the sky blue?", max_tokens=5, n=2, temperature=1.0,
                            extra_body={"guided_choice": ["yes", "no", "maybe"]}),
        lambda: completions(model="tiny", prompt="A date:", max_tokens=12, temperature=0,
                            extra_body={"guided_regex": "20[0-9]{2}-(0[1-9]|1[0-2])"}),
        lambda: completions(model="tiny", prompt="Count:", max_tokens=12, temperature=0,
                            extra_body={"guided_grammar": 'root ::= ("one" | "two") (", " ("one" | "two"))?'}),
        lambda: chat(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40,
                     extra_body={"guided_json": SCHEMAS[1]}))
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj.choices[0]
    assert {c.text for c in choice.choices} <= {"yes", "no", "maybe"} and len(choice.choices) == 2
    assert regex.choices[0].finish_reason == "stop"
    assert len(regex.choices[0].text) == 7 and regex.choices[0].text.startswith("20")
    assert ebnf.choices[0].text in ("one", "two", "one, one", "one, two", "two, one", "two, two")
    jsonschema.validate(json.loads(guided.choices[0].message.content), SCHEMAS[1])


def test_the_pipeline_takes_a_pydantic_model(pipe):
    gens = [GenerationConfig(max_new_tokens=80, temperature=0, guided_json=Person),
            GenerationConfig(max_new_tokens=4, guided_choice=["up", "down"]),
            GenerationConfig(max_new_tokens=8, temperature=0, response_format={"type": "json_schema", "json_schema": {
                "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
                                        "required": ["n"]}}})]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}}]  # SmolLM2's template knows no tools: they go in a system prompt, Hermes' way
    gens.append(GenerationConfig(max_new_tokens=60, temperature=0, tools=tools, tool_choice="required",
                                 parallel_tool_calls=False))
    person, updown, number, call = pipe([MESSAGES, "Up or down?", "A number?", "What is 2 + 3?"], gens)
    assert person.finish_reason == "stop"
    Person.model_validate_json(person.text)
    assert updown.text in ("up", "down") and json.loads(number.text)["n"] <= 9
    assert call.finish_reason == "tool_calls" and [c.name for c in call.tool_calls] == ["add"], call
    jsonschema.validate(json.loads(call.tool_calls[0].arguments), tools[0]["function"]["parameters"])


def test_grammar_requests_run_ahead_with_the_plain_loops_tokens(tiny_models, engine_cache):
    """Overlapped steps with a constrained request in the batch: the steps still run ahead (each one drawn once the
    matchers have accepted the tokens in flight), and every request, constrained or not, gets the plain loop's
    tokens."""
    from cluster.engine.engine import LLMEngine

    path, _ = tiny_models("llama")

    def make(overlap: bool) -> LLMEngine:
        return LLMEngine(str(path), EngineConfig(cache_dir=engine_cache, device="cpu", overlap_steps=overlap))

    free = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    guided = GenerationConfig(max_new_tokens=12, temperature=0, guided_regex="[a-z]{3,6}[0-9]{2}")
    plain, overlapped = make(False), make(True)
    want = plain.generate(["Hi", "Hello", "Hey"], [free, guided, free])
    got = overlapped.generate(["Hi", "Hello", "Hey"], [free, guided, free])
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[1].finish_reason == "stop" and re.fullmatch("[a-z]{3,6}[0-9]{2}", got[1].text)
    # every step after the prefill ran ahead, the constrained request's ones too
    assert overlapped.stats.steps_ahead == overlapped.stats.steps - 1 >= 11
    assert overlapped.bm.num_free == overlapped.bm.num_blocks


@pytest.mark.parametrize("patch, param, contains", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema"}}, None, "needs json_schema"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "json_schema"),
    ({"guided_regex": "(?=a)b"}, "guided_regex", "Lookahead is not supported"),  # xgrammar's word, from rank 0
    ({"guided_grammar": 'root ::= "a" | '}, "guided_grammar", "EBNF"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "guided_json",
     "cannot be used"),
    ({"guided_regex": "a{1,100000}"}, "guided_regex", "bound"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, None, "at most one"),
])
def test_bad_constraints_are_400_with_an_openai_body(server, patch, param, contains):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **patch}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert contains in err["message"], err
    if param:
        assert err["param"] == param, err
