"""`cluster client URL`: multi-turn chat in the terminal against a running OpenAI-compatible server (streamed).

History is kept and re-sent each turn (the server's prefix cache makes old turns cheap); `exit` or Ctrl-D leaves,
Ctrl-C stops the current answer (closing the stream aborts it on the server), `/clear` starts over, `/image PATH`
attaches an image to the next message (sent inline as a data: URL, for vision-language models)."""
from __future__ import annotations

import json
import sys
from typing import Iterator

import httpx

from cluster.engine.multimodal import data_url, image_command, user_content


class APIClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001
                msg = r.text[:200]
            raise RuntimeError(f"HTTP {r.status_code}: {msg}")

    def models(self) -> list[str]:
        try:
            r = self.http.get("/v1/models")
        except httpx.HTTPError as e:
            raise RuntimeError(f"cannot reach {self.http.base_url}: {e}") from None
        self._raise(r)
        return [m["id"] for m in r.json()["data"]]

    def chat_stream(self, model: str, messages: list[dict], **params) -> Iterator[dict]:
        """Yields {"text": piece} while streaming, then {"usage": ..., "finish_reason": ...}."""
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in params.items() if v is not None}}
        finish = None
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        yield {"text": piece}
                    finish = c.get("finish_reason") or finish
                if chunk.get("usage"):
                    yield {"usage": chunk["usage"], "finish_reason": finish}

    def close(self) -> None:
        self.http.close()


def chat_loop(client: APIClient, model: str | None = None, system: str | None = None, stats: bool = False,
              **params) -> int:
    model = model or client.models()[0]
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"chat with {model}; 'exit' or Ctrl-D to leave, Ctrl-C stops an answer, '/clear' starts over, "
          "'/image PATH' attaches an image to your next message", flush=True)
    images: list[str] = []
    while True:
        try:
            prompt = input("\n>>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if prompt.strip() in ("exit", "quit"):
            return 0
        if prompt.strip() == "/clear":
            history = history[:1] if system else []
            continue
        path = image_command(prompt)
        if path is not None:
            try:
                images.append(data_url(path))
                print(f"[image attached: {path}; it goes with your next message]", flush=True)
            except ValueError as e:
                print(f"[error: {e}]", flush=True)
            continue
        if not prompt.strip():
            continue
        history.append({"role": "user", "content": user_content(prompt, images)})
        images = []
        answer, info = "", None
        stream = client.chat_stream(model, history, **params)
        try:
            for ev in stream:
                if "text" in ev:
                    answer += ev["text"]
                    print(ev["text"], end="", flush=True)
                else:
                    info = ev
        except KeyboardInterrupt:
            stream.close()
            print(" [stopped]", end="")
        except (RuntimeError, httpx.HTTPError) as e:
            print(f"\n[error: {e}]", end="", file=sys.stderr)
            if not answer:
                history.pop()
                print(flush=True)
                continue
        print(flush=True)
        history.append({"role": "assistant", "content": answer})
        if stats and info:
            u = info["usage"]
            print(f"[{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                  f"finish: {info['finish_reason']}]", flush=True)
