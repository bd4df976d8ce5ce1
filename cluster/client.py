"""`cluster client URL`: the terminal chat (cluster.chat_loop) against a running OpenAI-compatible server.

It talks through the `openai` SDK (which reads the SSE stream), so it sends what any OpenAI client sends. Every
failure is a RuntimeError of one line (`HTTP 401: <the server's message>`, `cannot reach ...`); closing a stream
closes its connection, which aborts the request on the server. Images go inline, as data: URLs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import openai

from cluster.chat_loop import chat_loop as run_chat
from cluster.engine.multimodal import data_url


def _message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):  # the SDK hands over the error body's "error" object, or the whole body
        body = body.get("error", body)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return body["message"]
    return e.response.text[:200] or e.message


class APIClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.sdk = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", max_retries=0,
                                 timeout=openai.Timeout(timeout, connect=10.0))  # the SDK's own type

    @contextmanager
    def _errors(self):
        """The SDK's exceptions as one-line RuntimeErrors."""
        try:
            yield
        except openai.APIStatusError as e:
            raise RuntimeError(f"HTTP {e.status_code}: {_message(e)}") from None
        except openai.APIConnectionError as e:
            raise RuntimeError(f"cannot reach {self.base_url}: {e.__cause__ or e}") from None
        except openai.APIError as e:  # an error event in a stream that had started
            raise RuntimeError(e.message) from None

    def models(self) -> list[str]:
        with self._errors():
            return [m.id for m in self.sdk.models.list()]

    def chat_stream(self, model: str, messages: list[dict], **params) -> Iterator[dict]:
        """Yields {"text": piece} while streaming, then {"usage": ..., "finish_reason": ...}."""
        kw = {k: v for k, v in params.items() if v is not None}
        finish = None
        with self._errors():
            stream = self.sdk.chat.completions.create(model=model, messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **kw)
            with stream:  # leaving early (Ctrl-C, close()) closes the connection
                for chunk in stream:
                    for c in chunk.choices:
                        if c.delta and c.delta.content:
                            yield {"text": c.delta.content}
                        finish = c.finish_reason or finish
                    if chunk.usage:
                        yield {"usage": chunk.usage.model_dump(), "finish_reason": finish}

    def close(self) -> None:
        self.sdk.close()


def chat_loop(client: APIClient, model: str | None = None, system: str | None = None, stats: bool = False,
              **params) -> int:
    """The terminal chat over `client`: the first model the server lists unless `model` names one."""
    model = model or client.models()[0]
    last: dict = {}

    def send(messages: list[dict]) -> Iterator[str]:
        last.clear()
        for ev in client.chat_stream(model, messages, **params):
            if "text" in ev:
                yield ev["text"]
            else:
                last.update(ev)

    def footer() -> str | None:
        if not (stats and last):
            return None
        u = last["usage"]
        return (f"[{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                f"finish: {last['finish_reason']}]")

    return run_chat(send, model, data_url, system, footer)
