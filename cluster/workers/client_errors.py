"""What a client is told when its request fails on rank 0: our own messages as they are, anything else generic
(a library's text, a bug's, or another request's stays in the log)."""
from __future__ import annotations

import dis
import logging

from cluster.messages import ErrorInfo

log = logging.getLogger(__name__)

BAD_PROMPT = "the prompt could not be tokenized: pass a string, token ids, or messages"
ENGINE_FAILED = "engine replica failed; the request was not completed, retry it"
INTERNAL = "internal error"


def written_for_users(e: BaseException) -> bool:
    """True when `e` came from a `raise` statement in the cluster package: those messages are written for callers.
    A library's error is not, nor a C extension's (its innermost Python frame is our call, not a raise)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module != "cluster" and not module.startswith("cluster."):
        return False
    code = tb.tb_frame.f_code.co_code
    return 0 <= tb.tb_lasti < len(code) and dis.opname[code[tb.tb_lasti]] == "RAISE_VARARGS"


def error_for(e: BaseException, rid: str, param: str | None = None, *, preparing: bool = False) -> ErrorInfo:
    """The error request `rid`'s client gets for `e` (naming `param` when the prompt was being prepared)."""
    from pydantic import ValidationError

    from cluster.engine.errors import (EngineDeadError, EngineOverloadedError, PromptTooLongError, RankLostError,
                                       RequestFailedError)
    from cluster.protocol import validation_error

    if isinstance(e, PromptTooLongError):
        return ErrorInfo("prompt_too_long", str(e), param=param, prompt_tokens=e.prompt_tokens,
                         max_tokens=e.max_new_tokens, session_len=e.session_len)
    if isinstance(e, EngineOverloadedError):
        return ErrorInfo("overloaded", str(e), retry_after=1)
    if isinstance(e, RankLostError):  # which rank was lost, and how: written for the clients it fails
        return ErrorInfo("engine_dead", str(e), retry_after=5)
    if isinstance(e, EngineDeadError):  # its text is the engine's death, logged where it died
        return ErrorInfo("engine_dead", ENGINE_FAILED, retry_after=5)
    if isinstance(e, RequestFailedError):  # written for the client: it names the exception's class only
        return ErrorInfo("internal", str(e))
    if isinstance(e, ValidationError):
        return ErrorInfo("bad_request", validation_error(e).message)
    if isinstance(e, (ValueError, TypeError)) and written_for_users(e):
        return ErrorInfo("bad_request", str(e) or type(e).__name__, param=param)
    if type(e).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):  # jinja chat templates
        return ErrorInfo("bad_request", f"chat template: {e}", param="messages")
    if preparing and isinstance(e, (ValueError, TypeError, OverflowError)):  # the tokenizer's word on the input
        log.warning("request %s: prompt refused by the tokenizer: %s: %s", rid, type(e).__name__, e)
        return ErrorInfo("bad_request", BAD_PROMPT, param=param)
    log.error("request %s failed", rid, exc_info=e)
    return ErrorInfo("internal", INTERNAL)
