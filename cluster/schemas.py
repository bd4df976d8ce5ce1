"""The request models of structured output and tool calling (OpenAI's response_format and tools, vLLM's guided_*
parameters) and the checks the router makes before an engine sees them. Torch-free: the router imports this.

The router checks shape and JSON-Schema validity (the `jsonschema` meta-schemas, present with Ray). It also
bounds the repetition counts, which set how long a grammar takes to compile. Rank 0 compiles the grammar
(cluster/engine/grammar.py). What xgrammar cannot compile is refused there, as a 400 that names the field.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", strict=True)
MAX_BOUND = 4096  # largest minLength/maxLength/minItems/... and regex repetition count: compile time grows with it
MAX_SOURCE = 256 * 1024  # characters of a regex, a grammar, or a schema's JSON text
MAX_TOOLS = 128
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
           "maxContains")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


def check_regex(pattern: str) -> None:
    if len(pattern) > MAX_SOURCE:
        raise ValueError(f"is over {MAX_SOURCE} characters")
    for m in _REPEAT.finditer(pattern):
        if any(g and int(g) > MAX_BOUND for g in m.groups()):
            raise ValueError(f"repetition {m.group(0)} is over the supported bound of {MAX_BOUND}")


def _walk(node: Any, path: str) -> None:
    """The bounds, everywhere in a schema (nested schemas included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _BOUNDS and isinstance(v, int) and not isinstance(v, bool) and v > MAX_BOUND:
                raise ValueError(f"{k} {v} at {path or '/'} is over the supported bound of {MAX_BOUND}")
            if k == "pattern" and isinstance(v, str):
                try:
                    check_regex(v)
                except ValueError as e:
                    raise ValueError(f"pattern at {path or '/'}: {e}") from None
            _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}/{i}")


def check_schema(schema: Any) -> None:
    """A JSON Schema (a dict, or true/false) valid against its meta-schema, within the bounds; ValueError says why."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError("must be a JSON Schema: an object")
    if len(json.dumps(schema)) > MAX_SOURCE:
        raise ValueError(f"is over {MAX_SOURCE} characters of JSON")
    _walk(schema, "")
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import Draft202012Validator, validator_for
    except ImportError:  # without jsonschema, rank 0's compiler is the only judge
        return
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"is not a valid JSON Schema: {e.message} (at {where})") from None


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field("response", pattern=NAME)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema", description="the JSON Schema the output follows")
    strict: Optional[bool] = Field(None, description="accepted; the output always follows the schema")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v):
        if v is not None:
            check_schema(v)
        return v


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema: {'name': ..., 'schema': {...}}")
        return self

    def gen(self) -> dict | None:
        if self.type == "text":
            return None
        return self.model_dump(by_alias=True, exclude_none=True)


class Guided(BaseModel):
    """vLLM's extra parameters for structured output (chat and completions), at most one per request."""

    guided_json: Optional[Union[dict, str]] = Field(None, description="a JSON Schema (vLLM's name)")
    guided_regex: Optional[str] = Field(None, max_length=MAX_SOURCE, description="a regular expression (vLLM's name)")
    guided_choice: Optional[list[str]] = Field(None, min_length=1, max_length=256,
                                               description="one of these strings (vLLM's name)")
    guided_grammar: Optional[str] = Field(None, max_length=MAX_SOURCE,
                                          description="an EBNF grammar, xgrammar's GBNF-like dialect (vLLM's name)")

    @field_validator("guided_json")
    @classmethod
    def _json(cls, v):
        if isinstance(v, str):
            try:
                v_obj = json.loads(v)
            except ValueError:
                raise ValueError("must be a JSON Schema: an object, or its JSON text") from None
            check_schema(v_obj)
        elif v is not None:
            check_schema(v)
        return v

    @field_validator("guided_regex")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            check_regex(v)
        return v

    @field_validator("guided_choice")
    @classmethod
    def _choice(cls, v):
        if v is not None and any(not c or len(c) > 4096 for c in v):
            raise ValueError("choices must be non-empty strings of at most 4096 characters")
        return v

    def guided_gen(self, response_format: Optional[ResponseFormat]) -> dict:
        g = {k: getattr(self, k) for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(self, k) is not None}
        rf = response_format.gen() if response_format is not None else None
        if rf is not None:
            g["response_format"] = rf
        if len(g) > 1:
            raise ValueError(f"at most one of response_format and guided_* per request, got {', '.join(sorted(g))}")
        return g


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(..., pattern=NAME)
    description: Optional[str] = None
    parameters: Optional[dict] = Field(None, description="a JSON Schema of the arguments (an object)")
    strict: Optional[bool] = None

    @field_validator("parameters")
    @classmethod
    def _params(cls, v):
        if v is not None:
            check_schema(v)
            if v.get("type", "object") != "object":
                raise ValueError("must be a JSON Schema of type object")
        return v


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = STRICT
    name: str
    arguments: str = Field(..., description="JSON text, as the API returned it")


class AssistantToolCall(BaseModel):
    """A call of an assistant message in the history."""

    model_config = STRICT
    id: str = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template(self) -> dict:
        """As chat templates read it: the arguments as an object (they render it with tojson)."""
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            raise ValueError(f"tool call {self.id!r}: function.arguments is not valid JSON") from None
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


class Tools(BaseModel):
    """The chat request's tool fields."""

    tools: Optional[list[Tool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None

    def tool_errors(self) -> Optional[tuple[str, str]]:
        """(param, message) of a tool_choice the tools cannot satisfy, or of two tools with one name."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            return "tools", "tools: two functions share a name"
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, NamedToolChoice):
            if not names:
                return "tool_choice", "tool_choice needs tools: give the functions the model may call"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            return "tool_choice", (f"tool_choice names function {self.tool_choice.function.name!r}, which is not "
                                   f"in tools ({', '.join(map(repr, names))})")
        return None

    def tools_gen(self) -> dict:
        if not self.tools or self.tool_choice == "none":
            return {}
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else (
            self.tool_choice or "auto")
        return {"tools": [t.model_dump(exclude_none=True) for t in self.tools], "tool_choice": choice,
                "parallel_tool_calls": self.parallel_tool_calls is not False}
