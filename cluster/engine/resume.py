"""A request resumed here after its replica failed mid-stream (failover, issue 16 part 2): its prompt ends with the
output the failed replica already sent (PreparedPrompt.resumed). Those tokens are fed through the request's
host-side state as the failed replica fed them, so that state is the uninterrupted run's at the move: the grammar's
matcher, the detokenizer (its held-back text, a partial character or a possible stop word, is what the client has
not seen yet: it comes out later, once) and the tool-call / reasoning parser (a call begun before the move is
parsed whole after it, and later calls are numbered after the earlier ones)."""
from __future__ import annotations

from cluster.engine.sequence import Sequence


def replay(seq: Sequence, sent: list[int]) -> None:
    """What LLMEngine._append_token does with each of `sent`, none of which finished the request; what they give
    is dropped (the client has it)."""
    for token in sent:
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise ValueError(f"the resumed output's token {token} does not follow this request's grammar")
        if seq.detok is None:
            continue
        seq.detok.add(token)
        text = seq.detok.take()
        if seq.parser is not None:
            seq.parser.feed(text)
