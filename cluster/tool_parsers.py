"""Tool calls and reasoning in a model's output, one format per model family; torch-free.

This runs on rank 0, beside the detokenizer (LLMEngine._append_token), not in the router. The format is a
property of the model's chat template and tokenizer, which only rank 0 has. Some markers are special tokens
(Mistral's [TOOL_CALLS], InternLM2's <|action_start|>) that only the detokenizer can keep. The router stays
model-agnostic. And the Python pipeline, which has no router, gets the same parsed calls.

    hermes       Qwen2.5 / Qwen3 / Hermes:  <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>  (repeated)
    llama3_json  Llama 3.1 / 3.2 JSON:      {"name": ..., "parameters": {...}}  (bare, or after <|python_tag|>; "; ")
    mistral      Mistral v0.3:              [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    mistral_v11  Mistral Small 3.x, Magistral, Devstral (tokenizer v11+):  [TOOL_CALLS]name[ARGS]{...}  (repeated;
                 [CALL_ID]id may stand before [ARGS]). Either Mistral format parses both shapes.
    internlm2    InternLM2:                 <|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>

Streaming: content text goes out as it comes, except a tail that could still become a marker. A call goes out
whole, once its closing marker (or the end of the output) shows that it is complete and parses. Markup that does
not parse goes back into the content, so nothing the model wrote is lost.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable, Collection

from cluster.messages import ToolCall


@dataclass(frozen=True)
class ToolFormat:
    """How a family writes tool calls: the markers the parser looks for, and the text the grammar (for a forced
    tool_choice) and the fallback prompt write."""

    name: str
    begin: str  # opens one call (`end` set) or all the calls, which then run to the end of the output
    end: str
    args_key: str  # "arguments" or "parameters"
    call: str  # one call; "{call}" stands for {"name": ..., args_key: {...}}, or "{name}" and "{args}" apart
    separator: str  # between two calls
    wrap: str = "{calls}"  # around all the calls
    bare_json: bool = False  # calls may also be the whole output as bare JSON, no marker
    args_marker: str = ""  # a call may be name + this + arguments JSON (Mistral's [ARGS]), not one JSON object

    def around_args(self, name: str) -> tuple[str, str]:
        """The text of one call before and after its arguments' JSON (what a forced call's grammar writes)."""
        if "{call}" in self.call:
            head, tail = self.call.split("{call}")
            return head + '{"name": ' + json.dumps(name, ensure_ascii=False) + f', "{self.args_key}": ', "}" + tail
        before, after = self.call.replace("{name}", name).split("{args}")
        return before, after

    def render(self, calls: list[tuple[str, object]]) -> str:
        """(name, arguments) pairs as this format writes them: for a template that does not render
        assistant tool_calls itself, and for the fallback prompt's example."""
        one = []
        for n, a in calls:
            before, after = self.around_args(n)
            one.append(before + json.dumps(a, ensure_ascii=False) + after)
        return self.wrap.replace("{calls}", self.separator.join(one))


FORMATS = {f.name: f for f in (
    ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", "<tool_call>\n{call}\n</tool_call>", "\n"),
    ToolFormat("llama3_json", "<|python_tag|>", "", "parameters", "{call}", "; ", bare_json=True),
    ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", "{call}", ", ", wrap="[TOOL_CALLS][{calls}]",
               args_marker="[ARGS]"),
    ToolFormat("mistral_v11", "[TOOL_CALLS]", "", "arguments", "[TOOL_CALLS]{name}[ARGS]{args}", "",
               args_marker="[ARGS]"),
    ToolFormat("internlm2", "<|action_start|><|plugin|>", "<|action_end|>", "parameters",
               "<|action_start|><|plugin|>\n{call}<|action_end|>", "\n"),
)}
_MARKERS = (("mistral_v11", "[ARGS]"), ("mistral", "[TOOL_CALLS]"), ("internlm2", "<|action_start|>"), ("hermes", "<tool_call>"),
            ("llama3_json", "<|python_tag|>"))


def detect_format(template: str | None, vocab: Collection[str] = ()) -> ToolFormat:
    """The family's format, from its chat template's text, else its tokenizer's tokens; Hermes' otherwise (what
    the fallback prompt, tools_prompt, then teaches a model whose template knows no tools)."""
    for name, marker in _MARKERS:
        if marker in (template or ""):
            return FORMATS[name]
    for name, marker in _MARKERS:
        if marker in vocab:
            return FORMATS[name]
    return FORMATS["hermes"]


def tools_prompt(fmt: ToolFormat, tools: list[dict]) -> str:
    """A system prompt that lists the tools, for a chat template that does not render them itself."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = fmt.render([("<function-name>", "<args-json-object>")]).replace('"<function-name>"', "<function-name>")
    example = example.replace('"<args-json-object>"', "<args-json-object>")
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{sigs}\n</tools>\n\nTo call a "
            f"function, answer with its name and arguments in this form:\n{example}")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker` (held back while streaming)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser:
    """feed(text, final) -> (content, calls), for one choice's output as it streams."""

    def __init__(self, fmt: ToolFormat, new_id: Callable[[], str] = new_call_id):
        self.fmt, self.new_id = fmt, new_id
        self.buf = ""
        self.inside = False  # in a call's markup
        self.bare = False  # ... that began as bare JSON (no marker)
        self.at_start = True
        self.count = 0  # calls emitted

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        fmt = self.fmt
        while True:
            if not self.inside:
                if self.at_start and fmt.bare_json:
                    head = self.buf.lstrip()
                    if not head and not final:
                        break  # only whitespace so far: it may still open bare JSON
                    self.at_start = False
                    if head.startswith("{"):
                        self.inside, self.bare, self.buf = True, True, head
                        continue
                i = self.buf.find(fmt.begin)
                if i < 0:
                    keep = 0 if final else _partial(self.buf, fmt.begin)
                    content.append(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content.append(self.buf[:i])
                self.buf = self.buf[i + len(fmt.begin):]
                self.inside, self.at_start = True, False
                continue
            if fmt.args_marker and self._named_shape():
                done, call, rest = self._named_call(final)
                if not done:
                    break
                if call is not None:
                    calls.append(call)
                else:  # not a call after all: the markup is content
                    content.append(fmt.begin + self.buf)
                self.buf, self.inside = rest, False
                continue
            closed = False
            if fmt.end and not self.bare:
                j = self.buf.find(fmt.end)
                if j >= 0:
                    body, rest, closed = self.buf[:j], self.buf[j + len(fmt.end):], True
                elif final:
                    body, rest = self.buf, ""  # never closed (cut by max_tokens, say): parsed if it parses
                else:
                    break
            elif final:
                body, rest = self.buf, ""
            else:
                break
            parsed = self._parse(body)
            if parsed:
                calls.extend(parsed)
            else:  # not a call after all: the markup is content
                content.append(("" if self.bare else fmt.begin) + body + (fmt.end if closed else ""))
            self.buf, self.inside, self.bare = rest, False, False
        return "".join(content), calls

    def _named_shape(self) -> bool:
        """After Mistral's [TOOL_CALLS]: `name[ARGS]{...}` (v11+) rather than a JSON list (v0.3)."""
        head = self.buf.lstrip()
        return bool(head) and head[0] not in "[{"

    def _named_call(self, final: bool) -> tuple[bool, ToolCall | None, str]:
        """One `name[CALL_ID]id[ARGS]{...}` call at the start of the buffer: (complete, the call or None when it
        is not one, the text after it). Complete once its arguments' JSON closes, or at the end of the output."""
        marker = self.fmt.args_marker
        i = self.buf.find(marker)
        if i < 0:
            return (True, None, "") if final else (False, None, "")
        name, call_id = self.buf[:i].strip(), ""
        if "[CALL_ID]" in name:
            name, call_id = (x.strip() for x in name.split("[CALL_ID]", 1))
        after = self.buf[i + len(marker):]
        start = len(after) - len(after.lstrip())
        try:
            args, end = json.JSONDecoder().raw_decode(after, start)
        except ValueError:
            return (True, None, "") if final else (False, None, "")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not name or any(c.isspace() or c in "[]{}\"" for c in name) or not isinstance(args, dict):
            return True, None, ""
        call = ToolCall(self.count, name, json.dumps(args, ensure_ascii=False), call_id or self.new_id())
        self.count += 1
        return True, call, after[end:]

    def _parse(self, body: str) -> list[ToolCall] | None:
        """Every call in `body` (one JSON object, a list of them, or several separated by ';' or ','), or None
        when any part of it is not a call."""
        dec = json.JSONDecoder()
        s, pos, objs = body.strip(), 0, []
        while pos < len(s):
            try:
                obj, pos = dec.raw_decode(s, pos)
            except ValueError:
                return None
            objs.extend(obj if isinstance(obj, list) else [obj])
            while pos < len(s) and s[pos] in " \t\r\n;,":
                pos += 1
        out = []
        for o in objs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
                return None
            args = o.get("arguments", o.get("parameters", {}))
            if isinstance(args, str):  # some models write the arguments as JSON text
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            out.append(ToolCall(self.count + len(out), o["name"], json.dumps(args, ensure_ascii=False),
                                self.new_id()))
        self.count += len(out)
        return out or None


class ReasoningParser:
    """feed(text, final) -> (reasoning, content): what a thinking template's model writes between <think> and
    </think> is reasoning. `opened`: the prompt itself ended in <think> (DeepSeek-R1's template), so the output
    starts inside the block; otherwise a block can open only at the very start of the output."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"
        self.buf = ""
        self.strip = True  # leading whitespace of the reasoning and of the content after it is dropped

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(self.OPEN):
                self.state, self.buf = "reasoning", head[len(self.OPEN):]
            elif self.OPEN.startswith(head) and not final:
                return "", ""
            else:
                self.state, self.strip = "content", False
        if self.state == "reasoning":
            i = self.buf.find(self.CLOSE)
            if i >= 0:
                reasoning, self.buf, self.state = self.buf[:i], self.buf[i + len(self.CLOSE):], "content"
            else:
                keep = 0 if final else _partial(self.buf, self.CLOSE)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            reasoning = self._lstrip(reasoning)
            if self.state == "content":
                self.strip = True
        if self.state == "content":
            content, self.buf = self._lstrip(self.buf), ""
        return reasoning, content

    def _lstrip(self, text: str) -> str:
        if self.strip:
            text = text.lstrip()
            self.strip = not text
        return text


class OutputParser:
    """Reasoning first, then tool calls in what is left: feed(text, final) -> (content, reasoning, calls)."""

    def __init__(self, tools: ToolFormat | None = None, reasoning: bool = False, opened: bool = False):
        self.tools = ToolCallParser(tools) if tools is not None else None
        self.reasoning = ReasoningParser(opened) if reasoning else None

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        reasoning, content = self.reasoning.feed(text, final) if self.reasoning else ("", text)
        calls: list[ToolCall] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
        return content, reasoning, calls

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.count > 0

    def parse(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """A whole output at once."""
        return self.feed(text, final=True)
