"""Images in prompts: the forms a user may pass them in, decoded to PIL images, and the prompt text that stands
for them (the model's image token, which the tokenizer expands to one token per image embedding).

Accepted image parts of a message's content list (OpenAI style, plus a direct form for the Python API):
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "/local/path.png"}}
  {"type": "image", "image": PIL.Image | bytes | "/local/path.png"}
The pipeline's `(text, image)` and `(text, [images])` tuples become one user message of such parts."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

IMAGE_TYPES = ("image_url", "image")
MAX_IMAGE_BYTES = 20 * 2**20  # an encoded image, inline or read from a file
MAX_IMAGE_PIXELS = 40_000_000  # decoded width x height: a decompression bomb is refused before it is decoded
INLINE_ONLY = ("image_url must be an inline data:image/...;base64 URL: over HTTP the server neither reads its own "
               "files nor fetches URLs")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_TYPES


def load_image(obj: Any):
    """PIL image (RGB) from a PIL image, raw bytes, a data: URL or a local path; ValueError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(obj, Image.Image):
        if obj.width == 0 or obj.height == 0:
            raise ValueError("image has no pixels")
        return obj.convert("RGB")
    data: bytes
    if isinstance(obj, (bytes, bytearray)):
        data = bytes(obj)
    elif isinstance(obj, str) and obj.startswith("data:"):
        header, _, payload = obj.partition(",")
        if ";base64" not in header:
            raise ValueError("image data URL must be base64 encoded (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise ValueError("image data URL is not valid base64") from None
    elif isinstance(obj, str) and obj.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched (no network access from the engine); send the image inline "
                         "as a data:image/...;base64 URL")
    elif isinstance(obj, (str, Path)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise ValueError(f"image file {str(obj)[:200]!r} does not exist")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"image file is over {MAX_IMAGE_BYTES >> 20} MiB")
        data = path.read_bytes()
    else:
        raise ValueError(f"an image must be a PIL image, bytes, a data: URL or a file path, not {type(obj).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is over {MAX_IMAGE_BYTES >> 20} MiB")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {img.width} x {img.height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are "
                             "accepted: scale it down")
        if img.width == 0 or img.height == 0:
            raise ValueError("image has no pixels")
        img.load()
    except Image.DecompressionBombError:  # PIL's own refusal, from the header, of sizes far past ours
        raise ValueError(f"image is over {MAX_IMAGE_PIXELS:,} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are "
                         "accepted: scale it down") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError("image could not be decoded (PNG, JPEG, GIF, BMP and WebP are read)") from None
    return img.convert("RGB")


def check_inline_images(prompt: Any) -> None:
    """For prompts from remote callers: every image is an inline data: URL of bounded size (ValueError, one message
    whatever the URL was, so no caller learns which of the server's paths exist). Local paths, bytes and PIL images
    stay a Python-API feature."""
    if not isinstance(prompt, list):
        return
    for m in prompt:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if not is_image_part(part):
                continue
            check_inline_url(_part_image(part) if part.get("type") == "image_url" else None)


def check_inline_url(url: Any) -> None:
    """An image URL a remote caller may send: an inline data: URL of bounded size, else ValueError."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError(INLINE_ONLY)
    if len(url) > MAX_IMAGE_BYTES * 4 // 3 + 100:
        raise ValueError(f"image is over {MAX_IMAGE_BYTES >> 20} MiB")


def _part_image(part: dict) -> Any:
    if part["type"] == "image":
        return part.get("image")
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def split_content(content: Any, image_text: str) -> tuple[str, list[Any]]:
    """A message's content -> its text with `image_text` (the model's image token, and what surrounds it: see
    Tokenizer.image_text) where each image was, and the raw images in order. Text parts join with nothing between
    them, as the HTTP API's do."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of content parts")
    texts, images = [], []
    for part in content:
        if is_image_part(part):
            images.append(_part_image(part))
            texts.append(image_text)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise ValueError(f"unsupported content part {str(part)[:80]}: expected text, image_url or image")
    return "".join(texts), images


def has_images(prompt: Any) -> bool:
    return isinstance(prompt, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"])
        for m in prompt)


def prompt_images(prompt: Any) -> list:
    """Every image of a message-list prompt, decoded, in order."""
    if not isinstance(prompt, list):
        return []
    raw = [img for m in prompt if isinstance(m, dict) for img in split_content(m.get("content", ""), "")[1]]
    return [load_image(x) for x in raw]


def from_tuple(text: str, images: Any) -> list[dict]:
    """The pipeline's (text, image or [images]) -> one user message: the images, then the text."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    parts = [{"type": "image", "image": img} for img in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


IMAGE_COMMAND = "/image"  # in `cluster chat` and `cluster client`: attach a file to the next message


def image_command(line: str) -> str | None:
    """The path of a `/image PATH` line, else None."""
    line = line.strip()
    if line == IMAGE_COMMAND or line.startswith(IMAGE_COMMAND + " "):
        return line[len(IMAGE_COMMAND):].strip()
    return None


def data_url(path: str) -> str:
    """A local image file as a data: URL, checked to decode (ValueError says what is wrong)."""
    from PIL import Image

    load_image(path)
    data = Path(path).expanduser().read_bytes()
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def user_content(text: str, images: list[str]) -> str | list[dict]:
    """A user turn: the text alone, or the images (paths or data: URLs) as image_url parts, then the text."""
    if not images:
        return text
    return [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
