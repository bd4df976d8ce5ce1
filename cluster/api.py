"""The Python API: `pipeline(model)(prompts)`, streaming, and multi-turn sessions."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Iterator, Union

from cluster.config import EngineConfig, GenerationConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import Response
from cluster.engine.multimodal import from_tuple
from cluster.engine.tokenizer import Prompt, with_tools
from cluster.schemas import AssistantToolCall, ToolCallFunction

Prompts = Union[Prompt, tuple, list[Union[Prompt, tuple]]]


def _is_single(prompts: Prompts) -> bool:
    if isinstance(prompts, (str, tuple)):
        return True  # a string, or (text, image or [images])
    if isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts):
        return True  # one conversation
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return True  # one prompt as token ids
    return False


@dataclass
class Session:
    """A conversation: its history is re-sent each turn; the prefix cache makes the old turns nearly free. An
    answer's tool calls stay in it (the assistant message's `tool_calls`, arguments as objects, as chat templates
    read them); add_tool_result then gives the model each call's result, and chat(None, session) its next turn."""

    messages: list[dict] = field(default_factory=list)
    last: Response | None = None

    @property
    def response(self) -> Response | None:
        return self.last

    def add_tool_result(self, tool_call_id: str, content: str) -> "Session":
        """A `tool` message answering the call `tool_call_id` of the last answer."""
        called = {c["id"] for m in self.messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ()}
        if tool_call_id not in called:
            raise ValueError(f"no tool call {tool_call_id!r} in this session (its calls: {sorted(called) or 'none'})")
        self.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})
        return self


def assistant_message(result: Response) -> dict:
    """A finished answer as a history message: its text, and its tool calls as a chat template reads them."""
    msg: dict = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        msg["tool_calls"] = [AssistantToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments))
                             .template() for c in result.tool_calls]
    return msg


class Pipeline:
    def __init__(self, model: str | None = None, engine_config: EngineConfig | None = None,
                 gen_config: GenerationConfig | None = None, do_preprocess: bool = True):
        self.engine = AsyncEngine.from_model(model, engine_config)
        self.do_preprocess = do_preprocess
        self.gen_config = gen_config or GenerationConfig()
        self.tokenizer = self.engine.tokenizer

    def _gens(self, n: int, gen_config: GenerationConfig | list[GenerationConfig] | None) -> list[GenerationConfig]:
        if isinstance(gen_config, list):
            if len(gen_config) != n:
                raise ValueError(f"got {len(gen_config)} generation configs for {n} prompts")
            return gen_config
        return [gen_config or self.gen_config] * n

    def _preprocess(self, prompt: Prompt | tuple) -> Prompt:
        """Like LMDeploy: a plain string is a user turn, wrapped in the model's chat template when it has one;
        (text, image or [images]) is a user turn with the images before the text."""
        if isinstance(prompt, tuple):
            if len(prompt) != 2 or not isinstance(prompt[0], str):
                raise ValueError("an image prompt is (text, image) or (text, [images])")
            return from_tuple(*prompt)
        if self.do_preprocess and isinstance(prompt, str) and self.tokenizer.hf.chat_template:
            return [{"role": "user", "content": prompt}]
        return prompt

    def _submit_all(self, prompts: list[Prompt], gens: list[GenerationConfig]) -> tuple[list[str], queue.Queue]:
        """Validate everything first, so a bad prompt fails the call before any request starts."""
        prompts = [self.engine.prepare_prompt(with_tools(self._preprocess(p), g.tools, g.tool_choice))
                   for p, g in zip(prompts, gens)]
        for p, g in zip(prompts, gens):
            self.engine.validate(p, g)
        sink: queue.Queue = queue.Queue()
        rids = []
        for p, g in zip(prompts, gens):
            rid, _ = self.engine.submit(p, g, None, None, sink)
            rids.append(rid)
        return rids, sink

    def stream_infer(self, prompts: Prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None
                     ) -> Iterator[Response]:
        """Yield Response chunks (new text and tokens; `index` says which prompt) as they are generated. With
        GenerationConfig(tools=...) a chunk may carry parsed `tool_calls` (finish_reason "tool_calls"); with a
        thinking template, `reasoning` apart from `text`; with response_format / guided_*, the text follows it."""
        plist = [prompts] if _is_single(prompts) else list(prompts)
        rids, sink = self._submit_all(plist, self._gens(len(plist), gen_config))
        index = {rid: i for i, rid in enumerate(rids)}
        pending = set(rids)
        try:
            while pending:
                item = sink.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    pending.discard(item.request_id)
                yield Response(index=index[item.request_id]).merge(item)
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def __call__(self, prompts: Prompts, gen_config: GenerationConfig | list[GenerationConfig] | None = None
                 ) -> Response | list[Response]:
        single = _is_single(prompts)
        plist = [prompts] if single else list(prompts)
        results = [Response(index=i) for i in range(len(plist))]
        for chunk in self.stream_infer(plist, gen_config):
            results[chunk.index].merge(chunk)
        return results[0] if single else results

    infer = __call__

    def chat(self, prompt: str | None, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream: bool = False, images: list | None = None):
        """One turn of a conversation; returns the session (or, with stream=True, an iterator of text pieces; the
        session gets the whole answer, tool calls included, when it ends). images: paths, data: URLs or PIL
        images shown with this turn's text (vision-language models). prompt None: no user message, the model
        answers the tool results just added (Session.add_tool_result). A turn that fails before its first token
        (a bad image, a prompt too long) leaves the session as it was."""
        session = session or Session()
        if prompt is None:
            if not session.messages or session.messages[-1].get("role") != "tool":
                raise ValueError("chat(None, session) answers tool results: add them with session.add_tool_result")
        else:
            parts = [{"type": "image", "image": im} for im in images or []]
            session.messages.append({"role": "user", "content": parts + [{"type": "text", "text": prompt}]
                                     if parts else prompt})

        def run() -> Iterator[str]:
            result = Response()
            try:
                for chunk in self.stream_infer(session.messages, gen_config):
                    result.merge(chunk)
                    yield chunk.text
            finally:
                if result.token_ids or result.finish_reason:
                    session.messages.append(assistant_message(result))
                    session.last = result
                elif prompt is not None:  # nothing came back: the turn did not happen
                    session.messages.pop()

        if stream:
            return run()
        for _ in run():
            pass
        return session

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model: str | None = None, engine_config: EngineConfig | None = None,
             gen_config: GenerationConfig | None = None, do_preprocess: bool = True, **engine_kwargs) -> Pipeline:
    """Build a pipeline; with no model, the embedded SmolLM2-135M-Instruct. Extra kwargs go to EngineConfig.

    do_preprocess: plain-string prompts get the model's chat template (False sends them raw)."""
    if engine_kwargs:
        engine_config = (engine_config or EngineConfig()).model_copy(update=engine_kwargs)
        engine_config = EngineConfig.model_validate(engine_config.model_dump())
    return Pipeline(model, engine_config, gen_config, do_preprocess)


__all__ = ["pipeline", "Pipeline", "Session", "Response", "assistant_message"]
