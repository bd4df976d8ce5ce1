"""JSON strings with minLength / maxLength as a chain of grammar rules that every schema shares.

xgrammar (0.2.8) lowers a bounded string to a counted repetition, `"\\"" chars{m, n} "\\""`. That is slow twice:
compiling it builds a token mask for each repeat count (about 8 ms each on SmolLM2's 49k vocabulary), anew in
every schema, and matching it keeps many parser states alive (about 1 ms a token, 6 ms near the bound). The
same language written as a right-recursive chain, one rule per number of characters still allowed,

    jstr_le2 ::= "\\"" | C jstr_le1      jstr_le1 ::= "\\"" | C jstr_le0      jstr_le0 ::= "\\""

is deterministic (one state alive: a few us a token), and its rules are the same text in every schema, so
xgrammar's compiler cache computes each rule's mask once per engine: `maxLength: 32` then reuses what `maxLength:
64` or a warm-up (Grammars.warm) already built. The character class C is xgrammar's own for bounded strings,
so the accepted strings do not change. Bounds above CHAIN_MAX keep xgrammar's counted form (a chain costs a
rule per character); see docs/serving.md.
"""
from __future__ import annotations

import hashlib
import re

CHAIN_MAX = 512  # longest minLength / maxLength written as a chain; larger ones stay counted repetitions

_CLASS_RULE = re.compile(r"^(\w+) ::= \(\((\[[^\n]*\])\)\)$", re.M)  # name ::= (([class]))
_BOUNDED = re.compile(r'"\\"" (\w+)\{(\d+), (-?\d+)\} "\\""')  # "\"" name{m, n} "\""


def _prefix(char_class: str) -> str:
    """Rule names per character class: the usual one reads `jstr`, any other gets a hash of its own."""
    if char_class == r'[^\"\\\r\n]':
        return "jstr"
    return "jstr" + hashlib.sha1(char_class.encode()).hexdigest()[:8]


class _Chains:
    """The chain rules one grammar needs, each written once."""

    def __init__(self):
        self.rules: dict[str, str] = {}

    def ref(self, cls: str, lo: int, hi: int) -> str:
        """The rule matching lo..hi characters of `cls` then the closing quote (hi -1: no upper bound). Built
        from the end of the chain back, so a long bound needs no deep recursion."""
        p = _prefix(cls)
        if hi < 0:
            name = f"{p}_any"
            self.rules.setdefault(name, f'{name} ::= (("\\"") | ({cls} {name}))')
            for k in range(1, lo + 1):
                nxt, name = name, f"{p}_ge{k}"
                self.rules.setdefault(name, f"{name} ::= (({cls} {nxt}))")
            return name
        name = ""
        for i in range(hi, -1, -1):  # i characters written: hi - i still allowed, lo - i still needed
            left, need = hi - i, max(0, lo - i)
            nxt, name = name, f"{p}_le{left}" + (f"_ge{need}" if need else "")
            if i == hi:
                body = '(("\\""))'
            elif need:
                body = f"(({cls} {nxt}))"
            else:
                body = f'(("\\"") | ({cls} {nxt}))'
            self.rules.setdefault(name, f"{name} ::= {body}")
        return name


def chain_ebnf(ebnf: str) -> str | None:
    """xgrammar's EBNF (Grammar.from_json_schema's text) with every bounded string of at most CHAIN_MAX
    characters as a chain; None when there is none to rewrite."""
    classes = {m.group(1): m.group(2) for m in _CLASS_RULE.finditer(ebnf)}
    chains = _Chains()

    def swap(m: re.Match) -> str:
        name, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        cls = classes.get(name)
        if cls is None or lo > CHAIN_MAX or hi > CHAIN_MAX or (hi >= 0 and lo > hi):
            return m.group(0)
        return '"\\"" ' + chains.ref(cls, lo, hi)

    out = _BOUNDED.sub(swap, ebnf)
    if not chains.rules:
        return None
    return out.rstrip("\n") + "\n" + "\n".join(chains.rules.values()) + "\n"


def warm_ebnf(max_len: int) -> str:
    """A grammar holding the chain for maxLength `max_len`: compiling it fills the compiler's cache with the
    rules every shorter bound uses."""
    chains = _Chains()
    top = chains.ref(r'[^\"\\\r\n]', 0, max_len)
    return f'root ::= (("\\"" {top}))\n' + "\n".join(chains.rules.values()) + "\n"
