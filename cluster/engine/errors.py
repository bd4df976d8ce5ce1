"""Errors the engine raises for callers' mistakes and for its own failures; each message says what to change."""


class EngineError(Exception):
    pass


class PromptTooLongError(EngineError, ValueError):
    def __init__(self, prompt_tokens: int, max_new_tokens: int, session_len: int):
        self.prompt_tokens, self.max_new_tokens, self.session_len = prompt_tokens, max_new_tokens, session_len
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} exceeds the session length {session_len}; "
            "shorten the prompt, lower max_new_tokens, or raise session_len")


class EngineOverloadedError(EngineError):
    def __init__(self, waiting: int, limit: int):
        super().__init__(f"engine overloaded: {waiting} requests waiting (limit {limit}); retry later")


class EngineDeadError(EngineError):
    pass


class RankLostError(EngineDeadError):
    """A tensor-parallel rank is gone. Its message (which rank, how it ended) is written by the executor for the
    clients whose requests it ends; other EngineDeadErrors may wrap text that is not theirs to read."""


class RequestFailedError(EngineError):
    """One request failed inside the engine (its output's post-processing, or its images' encoding); the others go
    on. The message names the exception's class only: the details are in the server log."""

    def __init__(self, error: BaseException, where: str = "while its output was processed"):
        super().__init__(f"the request failed {where} ({type(error).__name__}) and was "
                         "stopped; retry it, and report it if it fails again")


class OutOfMemoryError(EngineError, MemoryError):
    pass
