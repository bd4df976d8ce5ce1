"""What the router checks before a request costs an engine anything: the body's size, a cheap lower bound on the
prompt's tokens, and where images come from. No torch: the router process imports this.

Each check is cheap and runs on the router's event loop; what is expensive (tokenizing, decoding images) happens
on rank 0, off its step loop, only for requests that pass these."""
from __future__ import annotations

import asyncio
import base64
import math
import mimetypes
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from cluster.engine.multimodal import INLINE_ONLY, MAX_IMAGE_BYTES, check_inline_url, is_image_part
from cluster.messages import ReplicaInfo
from cluster.protocol import APIError, prompt_chars

MAX_REQUEST_BYTES = 16 * 2**20  # default body cap: a few large inline images, or a prompt far past any context


async def read_body(request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be over `limit` (by Content-Length, else while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body is {'over ' if size > limit else ''}{size:,} bytes; this server takes at most "
                         f"{limit:,} (--max-request-bytes)", code="request_too_large")


def check_fits(prompts: list, max_tokens: Optional[int], info: ReplicaInfo, param: str) -> None:
    """400 for a prompt that cannot fit the session whatever the tokenizer makes of it. No token stands for more
    than `max_token_chars` characters, so a text of C characters is at least C / max_token_chars tokens; token-id
    prompts are counted exactly. The engine checks the exact count later; this only saves it from tokenizing
    megabytes that could never run."""
    session_len, per_token = info.session_len, info.max_token_chars
    if not session_len:
        return
    for p in prompts:
        if isinstance(p, list) and p and isinstance(p[0], int):
            at_least = len(p)
        elif per_token:
            at_least = math.ceil(prompt_chars(p) / per_token)
        else:
            continue
        if at_least + (max_tokens or 1) > session_len:
            raise APIError(400, f"This model's maximum context length is {session_len} tokens. However, the prompt "
                                f"has at least {at_least} tokens{f' and max_tokens is {max_tokens}' if max_tokens else ''}."
                                " Please reduce the length of the prompt or max_tokens.", param=param,
                           code="context_length_exceeded")


def image_error(image_dir: Optional[str]) -> APIError:
    """The one error for every image source refused: the same words whether a path exists or not."""
    where = f"; or a file under the server's image directory, named relative to it" if image_dir else ""
    return APIError(400, INLINE_ONLY + where, param="messages", code="invalid_image_url")


async def inline_images(messages: list[dict], image_dir: Optional[str]) -> list[dict]:
    """Every image_url part as an inline data: URL. Other URLs are refused, except, when the operator named an image
    directory, paths inside it (read here, size-capped, and sent inline: rank 0 never reads a path for a remote
    caller)."""
    out = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            if is_image_part(part):
                part = {**part, "image_url": {"url": await _inline_url(part, image_dir)}}
            parts.append(part)
        out.append({**m, "content": parts})
    return out


async def _inline_url(part: dict, image_dir: Optional[str]) -> str:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url.startswith("data:"):
        try:
            check_inline_url(url)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_image_url") from None
        return url
    if not isinstance(url, str) or not image_dir or "://" in url:
        raise image_error(image_dir)
    data = await asyncio.to_thread(_read_under, image_dir, url)
    if data is None:
        raise image_error(image_dir)
    kind = mimetypes.guess_type(url)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _read_under(root: str, name: str) -> Optional[bytes]:
    """The bytes of the regular file `name` inside `root` (symlinks and `..` resolved first), else None."""
    try:
        base = Path(root).resolve(strict=True)
        path = (base / name.removeprefix("file:")).resolve(strict=True)
        if not path.is_relative_to(base) or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
            return None
        return path.read_bytes()
    except (OSError, ValueError):
        return None


class Cached:
    """The last answer of an expensive async call, reused for `ttl` seconds; concurrent callers share one call. A
    flood of /health or /metrics requests then costs the engines at most one round of calls per `ttl`."""

    def __init__(self, fn: Callable[[], Awaitable[Any]], ttl: float):
        self.fn, self.ttl = fn, ttl
        self._task: Optional[asyncio.Task] = None
        self._at = 0.0

    async def get(self) -> Any:
        t, stale = self._task, time.monotonic() - self._at > self.ttl
        if t is None or (t.done() and (stale or t.cancelled() or t.exception() is not None)):
            self._at = time.monotonic()
            self._task = asyncio.ensure_future(self.fn())
        return await asyncio.shield(self._task)

    def invalidate(self) -> None:
        """Something changed (an engine replica just failed a request): the next call asks again."""
        if self._task is not None and self._task.done():
            self._task = None
