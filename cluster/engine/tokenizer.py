"""Tokenizer wrapper (chat template, prompt forms) and incremental detokenization for streaming.

Streaming text never ends in a broken UTF-8 character (held back until the next token completes it) and never
shows a stop word, or the start of one, until it is known not to be one. Tools (ChatPrompt) go through the model's
own chat template; a template that knows no tools gets them as a system prompt in its family's call format."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Union

from cluster.engine.multimodal import has_images, is_image_part, split_content
from cluster.tool_parsers import OutputParser, ToolFormat, detect_format, tools_prompt

if TYPE_CHECKING:
    import torch

Prompt = Union[str, list[int], list[dict]]  # as callers write it


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt made ready for the engine by LLMEngine.prepare_prompt, on the caller's thread: its token ids (each
    image token already expanded) and its images as the model's processor left them (LLaVA: [n_images, 3, H, W];
    Qwen2-VL: every image's patches flattened, with image_grid), or None.
    Tokenizing and decoding images happen once, there; LLMEngine.validate then checks it against a request's
    GenerationConfig, and the engine's thread takes it as it is."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None
    chat: bool = False  # rendered by the chat template (its output may hold reasoning or tool calls)
    resumed: int = 0  # failover: the trailing token ids are output a failed replica already sent (host.resumed)
    image_grid: torch.Tensor | None = None  # Qwen2-VL: each image's (t, h, w) patch grid [n_images, 3]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def own_ids(self) -> list[int]:
        """The prompt's own token ids, without the resumed output: what the template ended with (think_state)."""
        return self.token_ids[:len(self.token_ids) - self.resumed]


class ChatPrompt(list):
    """Chat messages with the tools their template renders (GenerationConfig.tools): still a message list to
    everything else (images, admission checks)."""

    def __init__(self, messages: list[dict], tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools


def with_tools(prompt: Prompt, tools: list[dict] | None, tool_choice=None) -> Prompt:
    """`prompt` with `tools` for its template, when it is a message list and tools are to be offered."""
    if tools and tool_choice != "none" and isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return ChatPrompt(prompt, tools)
    return prompt


class Tokenizer:
    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        cfg = Path(path) / "config.json"
        vision = (json.loads(cfg.read_text()).get("vision") or {}) if cfg.exists() else {}
        self.image_token_id: int | None = vision.get("image_token_id")
        self.image_seq_len: int = vision.get("image_seq_len", 0)
        self.image_token = self.hf.convert_ids_to_tokens(self.image_token_id) if vision else None
        # the text that stands for an image in a message: LLaVA's token and a newline, as it was trained; Qwen2-VL's
        # <|vision_start|><|image_pad|><|vision_end|>, as its chat template writes an image part
        self.image_text = (self.image_token or "") + "\n"
        if "vision_start_token_id" in vision:
            self.image_text = "".join(self.hf.convert_ids_to_tokens(
                [vision["vision_start_token_id"], self.image_token_id, vision["vision_end_token_id"]]))
        # DeepSeek-VL: its processor's chat template iterates each message's content parts (an image part renders
        # as its image token), and the processor adds BOS unless the template wrote one
        self.content_parts: bool = bool(vision.get("content_parts"))
        if "image_start" in vision:  # InternVL: <img><IMG_CONTEXT></img>, as its processor expands "<IMG_CONTEXT>\n"
            self.image_text = vision["image_start"] + (self.image_token or "") + vision["image_end"] + "\n"

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @cached_property
    def max_token_chars(self) -> int:
        """At least the characters of text any one token stands for (a vocabulary entry is spelled with one
        character per byte, or per character, of its text), so len(text) / this bounds a text's token count from
        below without tokenizing it: the router uses it to refuse prompts that cannot fit, cheaply."""
        return max((len(t) for t in self.hf.get_vocab()), default=1) or 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def special_tokens(self) -> frozenset[str]:
        """Special tokens' texts: what skip_special_tokens drops, and what a grammar must match as one token."""
        added = getattr(self.hf, "added_tokens_decoder", {}) or {}
        return frozenset(self.hf.all_special_tokens) | {t.content for t in added.values() if t.special}

    @cached_property
    def tool_format(self) -> ToolFormat:
        vocab = self.hf.get_vocab()
        return detect_format(self.hf.chat_template if isinstance(self.hf.chat_template, str) else None, vocab)

    @property
    def grammar_tokens(self) -> list[str]:
        """The special tokens a grammar may name: the tool format's markers, the reasoning tags."""
        fmt = self.tool_format
        return [t for t in self.special_tokens if t in fmt.call + fmt.wrap + fmt.separator or t in ("<think>",
                                                                                                  "</think>")]

    @cached_property
    def renders_tools(self) -> bool:
        template = self.hf.chat_template
        return isinstance(template, str) and "tools" in template

    @cached_property
    def thinks(self) -> bool:
        """The template has reasoning blocks (<think>...</think>): the output's reasoning is parsed out."""
        template = self.hf.chat_template
        return isinstance(template, str) and "</think>" in template

    def think_state(self, prompt: PreparedPrompt) -> str | None:
        """None: no reasoning block; "opened": the template ended the prompt inside one (DeepSeek-R1's);
        "optional": the output may open one (Qwen3's)."""
        if not (prompt.chat and self.thinks):
            return None
        tail = self.decode(prompt.own_ids[-4:], skip_special_tokens=False).rstrip()
        return "opened" if tail.endswith("<think>") else "optional"

    def output_parser(self, prompt: PreparedPrompt, uses_tools: bool) -> OutputParser | None:
        """What splits a chat answer into content, reasoning and tool calls; None when there is nothing to split."""
        think = self.think_state(prompt)
        fmt = self.tool_format if uses_tools and prompt.chat else None
        if think is None and fmt is None:
            return None
        return OutputParser(fmt, think is not None, think == "opened")

    def keeps_markers(self, parser: OutputParser | None) -> bool:
        """The detokenizer must keep special tokens: the tool format's markers are some (Mistral's [TOOL_CALLS])."""
        if parser is None or parser.tools is None:
            return False
        fmt = parser.tools.fmt
        return any(t in fmt.begin or t in fmt.end for t in self.special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if tools and not self.renders_tools:
            messages = self._tools_as_text(messages, tools)
            tools = None
        if not self.hf.chat_template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        kw = {"tools": tools} if tools else {}
        if self.content_parts:
            messages = [{**m, "content": template_parts(m.get("content") or "")} for m in messages]
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)

    def _tools_as_text(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        """For a template that knows no tools: the tools in the system prompt, the history's calls and results
        as text in the family's format (Hermes' by default), so the model sees what a tool template would show."""
        fmt = self.tool_format
        out = [dict(m) for m in messages]
        for m in out:
            if m.get("tool_calls"):
                calls = fmt.render([(c["function"]["name"], c["function"]["arguments"]) for c in m.pop("tool_calls")])
                m["content"] = (m.get("content") or "") + ("\n" if m.get("content") else "") + calls
            if m.get("role") == "tool":
                m.pop("tool_call_id", None)
                m.update(role="user", content=f"<tool_response>\n{m.get('content', '')}\n</tool_response>")
        text = tools_prompt(fmt, tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{text}"
        else:
            out.insert(0, {"role": "system", "content": text})
        return out

    def prompt_ids(self, prompt: Prompt, image_lens: list[int] | None = None) -> list[int]:
        """A string, token ids, or an OpenAI-style message list (chat template applied) -> token ids. image_lens:
        the tokens each image stands for, in order (Qwen2-VL: by its size), else image_seq_len each."""
        if isinstance(prompt, str):
            return self.expand_images(self.encode(prompt), 0)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if not prompt:
                raise ValueError("prompt is empty")
            return list(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if "role" not in m or "content" not in m:
                    raise ValueError("each message needs 'role' and 'content'")
            if has_images(prompt) and self.image_token is None:
                raise ValueError("this model takes no images (it is not a vision-language model)")
            messages, n_images = [], 0
            parts = self.content_parts and bool(self.hf.chat_template)  # the template renders the image parts
            for m in prompt:
                text, images = split_content(m["content"], self.image_text)
                messages.append({**m, "content": m["content"] if parts else text})
                n_images += len(images)
            text = self.apply_chat_template(messages, getattr(prompt, "tools", None))
            bos = self.content_parts and not (self.hf.bos_token and text.startswith(self.hf.bos_token))
            return self.expand_images(self.encode(text, add_special_tokens=bos), n_images, image_lens)
        raise ValueError("prompt must be a string, a list of token ids, or a list of {'role', 'content'} messages")

    def expand_images(self, ids: list[int], n_images: int, image_lens: list[int] | None = None) -> list[int]:
        """Image token k -> image_lens[k] of them (image_seq_len by default), one per image embedding (what the
        model was trained on)."""
        if self.image_token_id is None:
            return ids
        found = ids.count(self.image_token_id)
        if found != n_images:
            raise ValueError(f"the prompt has {found} image token(s) {self.image_token!r} for {n_images} image(s); "
                             "pass images as content parts, which place the token for you")
        if not found:
            return ids
        lens = iter(image_lens if image_lens is not None else [self.image_seq_len] * found)
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(lens) if t == self.image_token_id else [t])
        return out


def template_parts(content: str | list) -> list[dict]:
    """A message's content as the parts a processor's chat template iterates: text parts, and {"type": "image"}
    where an image was (a plain string is one text part; transformers' processors leave strings as they are, which
    such a template renders as nothing)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "image"} if is_image_part(p) else {"type": "text", "text": p["text"]} for p in content]


class IncrementalDetokenizer:
    """Decodes a window of recent tokens each step and emits only the new, complete text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 stop_words: list[str] | None = None):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # some prompt context, so the first token's leading space decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text decoded so far (stop word excluded once found)
        self.emitted = 0  # characters of self.text already handed out
        self.stop_words = stop_words or []
        self.stopped = False

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._check_stop()

    def _check_stop(self) -> None:
        longest = max((len(w) for w in self.stop_words), default=0)
        start = max(0, self.emitted - longest)
        for w in self.stop_words:
            i = self.text.find(w, start)
            if i != -1:
                self.text = self.text[:i]
                self.stopped = True
                return

    def _holdback(self) -> int:
        """Length of the text's tail that could still grow into a stop word."""
        for n in range(min(len(self.text), max((len(w) for w in self.stop_words), default=0)), 0, -1):
            tail = self.text[-n:]
            if any(w.startswith(tail) for w in self.stop_words):
                return n
        return 0

    def take(self, final: bool = False) -> str:
        """New text that is safe to show; on `final`, everything that is left, less the bytes of a character the
        output was cut in the middle of (by max_new_tokens), which would decode to U+FFFD."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
            full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
            self.text += full[len(prefix):].rstrip("\ufffd")  # trailing only: never real text
            self.read_offset = len(self.ids)
            self._check_stop()
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._holdback()
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
