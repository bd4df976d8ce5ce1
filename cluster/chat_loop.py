"""The terminal chat of `cluster chat` (a local engine) and `cluster client` (a server over HTTP): one loop, so the
two cannot drift apart. What differs is passed in: `send(messages)` streams one answer as text pieces (closing the
iterator aborts the request), `attach(path)` turns `/image PATH` into the URL an image_url part carries.

The loop owns the history (re-sent each turn; the prefix cache makes old turns cheap). `exit`/`quit` or Ctrl-D
leave, Ctrl-C stops the current answer (its text so far stays in the history), `/clear` starts over, `/image PATH`
attaches an image to the next message. A turn that fails before any text (a bad image, a prompt too long, an
HTTP error) leaves the history as it was, and the chat goes on.
"""
from __future__ import annotations

from typing import Callable, Iterator

from cluster.engine.multimodal import image_command, user_content

Send = Callable[[list[dict]], Iterator[str]]

HELP = ("'exit' or Ctrl-D to leave, Ctrl-C stops an answer, '/clear' starts over, '/image PATH' attaches an image "
        "to your next message")


def chat_loop(send: Send, name: str, attach: Callable[[str], str], system: str | None = None,
              footer: Callable[[], str | None] | None = None,
              errors: tuple[type[BaseException], ...] = (ValueError, RuntimeError)) -> int:
    """Chat until the user leaves; returns the exit code (0). `errors` are what fails one turn, not the chat;
    `footer()`, if given, is printed after each answer (the client's token counts)."""
    start: list[dict] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    images: list[str] = []
    print(f"chat with {name}; {HELP}", flush=True)
    while True:
        try:
            prompt = input("\n>>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        line = prompt.strip()
        if line in ("exit", "quit"):
            return 0
        if line == "/clear":
            history, images = list(start), []
            print("[history cleared]", flush=True)
            continue
        path = image_command(prompt)
        if path is not None:
            try:
                images.append(attach(path))
                print(f"[image attached: {path}; it goes with your next message]", flush=True)
            except ValueError as e:
                print(f"[error: {e}]", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": user_content(prompt, images)})
        images = []
        answer = _answer(send(history), errors)
        if answer:
            history.append({"role": "assistant", "content": answer})
        else:  # nothing came back: the turn did not happen
            history.pop()
        note = footer() if footer and answer else None
        if note:
            print(note, flush=True)


def _answer(pieces: Iterator[str], errors: tuple[type[BaseException], ...]) -> str:
    """Print one streamed answer; returns its text (what came before a Ctrl-C or an error included)."""
    answer = ""
    try:
        for text in pieces:
            answer += text
            print(text, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    except errors as e:
        print(("\n" if answer else "") + f"[error: {e}]", end="")
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # aborts the request (a local engine's, or the server's when the connection closes)
    print(flush=True)
    return answer
