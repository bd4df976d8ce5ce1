"""Cache-aware replica choice: prefix keys, the bounded table, the choice rule, and the Serve router built on them
(fake replicas, no cluster), then multi-turn chats over two real replicas (`cluster serve`)."""
from __future__ import annotations

import asyncio
import time
import tracemalloc
from types import SimpleNamespace

import pytest

from cluster.messages import Choice, Job
from cluster.serving.affinity import AffinityPolicy, prefer
from cluster.serving.metrics import ROUTING, RouterMetrics
from cluster.serving.prefix_keys import TEXT_CHUNK_CHARS, prefix_keys
from cluster.serving.prefix_table import Match, PrefixTable

SYSTEM = {"role": "system", "content": "You answer questions about the sea. " * 10}


def chat(*turns: str) -> list[dict]:
    """A conversation: the system prompt, then user / assistant turns alternating (drop [0]: no system prompt)."""
    return [SYSTEM] + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# -- prefix keys ------------------------------------------------------------------------------------------------------
def test_a_later_turn_shares_every_key_of_the_earlier_one():
    t1, t2 = prefix_keys(chat("Why is it salty?")), prefix_keys(chat("Why is it salty?", "Rivers.", "And?"))
    assert len(t1) == 2 and len(t2) == 4
    assert t2[:2] == t1
    assert [tokens for _, tokens in t2] == sorted(tokens for _, tokens in t2)  # cumulative estimates
    other = prefix_keys(chat("Why is it blue?"))
    assert other[0] == t1[0] and other[1] != t1[1]  # same system prompt, a different question
    assert prefix_keys([{"role": "system", "content": "x"}])[0] != t1[0]


def test_text_and_token_prompts_key_by_runs():
    base = "a" * TEXT_CHUNK_CHARS * 2
    k1, k2 = prefix_keys(base), prefix_keys(base + "b" * 100)
    assert len(k1) == 2 and k2[:2] == k1 and len(k2) == 3
    assert prefix_keys("b" + base)[0] != k1[0]
    ids = list(range(200))
    assert prefix_keys(ids)[:3] == prefix_keys(ids + [7])[:3] and prefix_keys(ids)[-1][1] == 200
    assert prefix_keys("") == [] and prefix_keys([]) == []
    assert prefix_keys(chat("x")) == prefix_keys(chat("x")), "keys must not depend on the process (no salted hash)"


# -- the table ---------------------------------------------------------------------------------------------------------
def test_table_reports_the_longest_prefix_each_replica_holds():
    t = PrefixTable()
    k2, k4 = prefix_keys(chat("q1")), prefix_keys(chat("q1", "a1", "q2"))
    t.record(k2, "A")
    t.record(prefix_keys(chat("other")), "B")
    m = t.matched(k4, ["A", "B", "C"])
    # A: system + q1, its whole earlier prompt; B: the system prompt only, part of another; C: nothing
    assert m == {"A": Match(k2[-1][1], k2[-1][1]), "B": Match(k4[0][1])}
    assert t.matched(k2, ["A"]) == {"A": Match(k2[-1][1], k2[-1][1])}  # a repeat


def test_eviction_bounds_the_table_and_drops_long_prefixes_first():
    t = PrefixTable(max_entries=1000)
    convs = [prefix_keys(chat(f"question {i}", "answer", "more")) for i in range(600)]  # 4 keys each
    for i, keys in enumerate(convs):
        t.record(keys, "A" if i % 2 else "B")
    assert len(t) == 1000 and t.evicted == 600 * 3 + 2 - 1000  # the shared system key: once per replica
    last, first = convs[-1][-1][1], convs[0][0][1]
    assert t.matched(convs[-1], ["A", "B"]) == {"A": Match(last, last), "B": Match(first)}
    assert t.matched(convs[0], ["B"]) == {"B": Match(first)}  # old conversations gone, the shared prefix kept

    # whatever the eviction left, a remaining extension is reachable: its parent is used more recently
    for keys in convs:
        for r in ("A", "B"):
            held = [k for k, _ in keys if (k << 16 | t._slots[r]) in t._lru]
            assert held == [k for k, _ in keys[:len(held)]], "an entry survived its parent"


def test_table_memory_per_entry_is_small():
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    t = PrefixTable(max_entries=20_000)
    for i in range(10_000):
        t.record(prefix_keys(chat(f"q{i}", "a")), f"r{i % 4}")
    size = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(t) == 20_000
    per_entry = size / len(t)
    print(f"prefix table: {per_entry:.0f} bytes per entry")
    assert per_entry < 200, per_entry  # DEFAULT_MAX_ENTRIES (100k): ~11 MB


def test_forget_drops_a_replicas_entries():
    t = PrefixTable()
    keys = prefix_keys(chat("q"))
    t.record(keys, "A")
    t.record(keys, "B")
    t.forget("A")
    assert t.matched(keys, ["A", "B"]) == {"B": Match(keys[-1][1], keys[-1][1])} and len(t) == 2
    t.record(prefix_keys(chat("z")), "C")  # reuses A's slot: A's entries must not come back as C's
    assert t.matched(keys, ["C"]) == {"C": Match(keys[0][1])}


# -- the choice rule ---------------------------------------------------------------------------------------------------
POLICY = AffinityPolicy(margin_tokens=1000, margin_ratio=0.5, min_match_tokens=16, min_match_share=0.75)


def turn(tokens: int) -> Match:
    """A replica holding an earlier whole prompt of `tokens` that this one extends."""
    return Match(tokens, tokens)


def test_longest_prefix_wins_over_lighter_load():
    p = prefer({"A": 900, "B": 0, "C": 50}, {"A": turn(400), "B": turn(100)}, 500, POLICY)
    assert (p.replica, p.reason, p.matched_tokens) == ("A", "affinity", 400)


def test_equal_prefixes_go_to_the_least_loaded_of_them():
    assert prefer({"A": 300, "B": 100, "C": 0}, {"A": turn(400), "B": turn(400)}, 500, POLICY).replica == "B"


def test_overload_margin_falls_back_to_load():
    assert prefer({"A": 1000, "B": 0}, {"A": turn(400)}, 500, POLICY).replica == "A"  # at the margin: still A
    p = prefer({"A": 1001, "B": 0}, {"A": turn(400)}, 500, POLICY)
    assert (p.replica, p.reason) == (None, "overloaded")
    # the margin grows with the load: 50% of the least-loaded replica's 4000 tokens
    assert prefer({"A": 5900, "B": 4000}, {"A": turn(400)}, 500, POLICY).replica == "A"
    assert prefer({"A": 6100, "B": 4000}, {"A": turn(400)}, 500, POLICY).replica is None


def test_unknown_tiny_or_merely_shared_prefixes_fall_back_to_load():
    idle = {"A": 0, "B": 0}
    assert prefer(idle, {}, 500, POLICY).reason == "no_prefix"
    assert prefer(idle, {"A": turn(15)}, 20, POLICY).reason == "no_prefix"  # less than a KV block
    # a shared system prompt before a new first message: part of another prompt, under 75% of this one
    assert prefer(idle, {"A": Match(370)}, 500, POLICY).reason == "no_prefix"
    assert prefer(idle, {"A": Match(375)}, 500, POLICY).replica == "A"  # a long shared preamble counts
    assert prefer(idle, {"A": Match(370), "B": turn(200)}, 500, POLICY).replica == "B"  # B had the earlier turn


# -- the Serve router, with fake replicas ------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


def _replica(name: str, pending: int = 0):
    return SimpleNamespace(replica_id=name, routing_stats={"pending_work": pending}, max_ongoing_requests=100)


class Harness:
    """A CacheAwareRouter as Serve drives it: choose_replicas, then on_request_routed for the replica Serve took."""

    def __init__(self, margin_tokens: int = 1000):
        from ray.serve._private.common import DeploymentHandleSource, DeploymentID

        from cluster.serving.replica_choice import CacheAwareRouter

        self.router = CacheAwareRouter(deployment_id=DeploymentID(name="engine-t", app_name="t"),
                                       handle_source=DeploymentHandleSource.REPLICA)
        self.router.initialize_state(deployment="engine-t", margin_tokens=margin_tokens)
        self.n = 0

    async def send(self, replicas, prompt, max_tokens: int = 8, take: int = 0) -> str:
        """Route one request; Serve takes the `take`-th rank (1: the first was full). Returns the replica."""
        self.n += 1
        work = prefix_keys(prompt)[-1][1] + max_tokens  # as cluster.protocol estimates it, near enough
        job = Job(f"r{self.n}", [Choice(0, prompt, {"max_new_tokens": max_tokens})], work=work)
        pr = SimpleNamespace(args=[job], metadata=SimpleNamespace(internal_request_id=f"r{self.n}"))
        ranks = await self.router.choose_replicas(replicas, pr)
        chosen = ranks[take][0].replica_id
        self.router.on_request_routed(pr, chosen, None)
        return chosen


def _counts(deployment: str = "engine-t"):
    routed, affinity, by_load = ROUTING.snapshot()
    pick = lambda d: {k[1]: v for k, v in d.items() if k[0] == deployment}  # noqa: E731
    return pick(routed), pick(affinity), pick(by_load)


def _conversations(h: Harness, reps, n: int, turns: int, system: dict | None) -> tuple[dict, int]:
    """n conversations, interleaved turn by turn (nothing completes: the router's own charges are the load);
    returns (each conversation's last replica, how many turns after the first changed replica)."""
    async def go():
        homes, moved = {}, 0
        for turn in range(turns):
            for c in range(n):
                msgs = [{"role": "user" if i % 2 == 0 else "assistant",
                         "content": f"conversation {c}, question {i}: " + "why? " * 100 if i % 2 == 0 else "because"}
                        for i in range(2 * turn + 1)]
                got = await h.send(reps, ([system] if system else []) + msgs)
                moved += turn > 0 and got != homes[c]
                homes[c] = got
        return homes, moved

    return asyncio.run(go())


def test_router_keeps_each_conversation_on_its_replica():
    ROUTING.__init__()
    homes, moved = _conversations(Harness(), [_replica("A"), _replica("B")], n=8, turns=4, system=SYSTEM)
    assert moved == 0
    routed, affinity, by_load = _counts()
    assert sum(routed.values()) == 32 and sum(affinity.values()) == 24 and by_load == {"no_prefix": 8}
    assert sorted(list(homes.values()).count(r) for r in "AB") == [4, 4]  # new conversations: by load
    text = RouterMetrics().text()
    assert 'cluster_router_prefix_affinity_hits_total{model="engine-t",replica="A"}' in text
    assert 'cluster_router_routed_requests_total{model="engine-t",replica="B"}' in text


def test_a_long_shared_system_prompt_piles_new_conversations_only_up_to_the_margin():
    """A system prompt that is most of a first turn (75%) counts as a prefix: only A holds it at first, so new
    conversations prefer A until A is past the margin; then B gets one, holds it too, and from then on the tie goes
    to the less loaded. (SYSTEM above is under 75% of a first turn: new conversations went by load alone.)"""
    ROUTING.__init__()
    h = Harness(margin_tokens=1000)  # each first turn is ~900 tokens of work here
    homes, moved = _conversations(h, [_replica("A"), _replica("B")], n=12, turns=2,
                                  system={"role": "system", "content": "Be brief. " * 300})
    assert moved == 0
    assert sorted(list(homes.values()).count(r) for r in "AB")[0] >= 4, homes
    assert abs(h.router._work["A"] - h.router._work["B"]) <= 1000 + 2 * 1000
    _, _, by_load = _counts()
    assert by_load.get("overloaded", 0) >= 1


def test_router_falls_back_to_least_pending_and_moves_the_conversation():
    async def go():
        h = Harness(margin_tokens=1000)
        first = await h.send([_replica("A"), _replica("B", pending=500)], chat("hello there, a long question"))
        assert first == "A"  # nothing cached anywhere: least pending work
        busy = [_replica("A", pending=5000), _replica("B", pending=0)]
        second = await h.send(busy, chat("hello there, a long question", "hi", "more"))
        assert second == "B"  # A holds the prefix but is past the margin
        third = await h.send([_replica("A", pending=0), _replica("B", pending=200)],
                             chat("hello there, a long question", "hi", "more", "ok", "again"))
        assert third == "B"  # B now holds the longer prefix
        full = await h.send([_replica("A"), _replica("B")],
                            chat("hello there, a long question", "hi", "more", "ok", "again", "x", "y"), take=1)
        assert full == "A"  # Serve found B full and sent it to A: A holds it now
        nxt = await h.send([_replica("A"), _replica("B")],
                           chat("hello there, a long question", "hi", "more", "ok", "again", "x", "y", "z", "w"))
        assert nxt == "A"
        return h

    ROUTING.__init__()
    h = asyncio.run(go())
    _, _, by_load = _counts()
    assert by_load == {"no_prefix": 1, "overloaded": 1, "full": 1}
    h.router.on_replica_actor_died("A")
    assert "A" not in h.router._table.replicas()


def test_pending_work_router_counts_routed_requests():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from cluster.serving.replica_choice import PendingWorkRouter

    ROUTING.__init__()

    async def go():
        r = PendingWorkRouter(deployment_id=DeploymentID(name="engine-p", app_name="t"),
                              handle_source=DeploymentHandleSource.REPLICA)
        r.initialize_state(deployment="engine-p")
        for i in range(4):
            pr = SimpleNamespace(args=[Job(f"p{i}", [Choice(0, "hi", {"max_new_tokens": 4})], work=10)],
                                 metadata=SimpleNamespace(internal_request_id=f"p{i}"))
            ranks = await r.choose_replicas([_replica("A"), _replica("B")], pr)
            r.on_request_routed(pr, ranks[0][0].replica_id, None)

    asyncio.run(go())
    routed, affinity, by_load = _counts("engine-p")
    assert sum(routed.values()) == 4 and not affinity and not by_load


# -- two real replicas: multi-turn chats stay where their history is cached --------------------------------------------
WORDS = ("harbour tide gull anchor keel rope sail mast deck wave shell reef kelp brine storm calm pier dock oar "
         "lantern compass chart beacon current drift squall foam cove bay cliff dune").split()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`cluster serve` with two replicas of the embedded model and the default (cache-aware) routing, started the
    way test_serve_cluster.py starts its own (one implementation of launching)."""
    from test_serve_cluster import launch

    yield from launch(tmp_path_factory.mktemp("cache_aware") / "serve.log",
                      ["--num-cpus", "4", "--replicas", "2", "--cpus-per-worker", "1"])


def test_multi_turn_chats_land_where_their_history_is_cached(served):
    """16 conversations of 4 turns, interleaved (all at once, each turn after its previous answer). Each opens with
    its own ~300-token message, so a turn finds its history cached only on the replica that served the turn before
    (least pending work alone would find it there about half the time). Turns 2-4 must land there, and the engines
    must find at least 90% of their prompt tokens in the prefix cache."""
    import random

    import httpx
    from test_serve_cluster import KEY

    from cluster.serving.app import REPLICA_HEADER

    rng = random.Random(7)
    openers = [f"Conversation {i}. Remember these words: " + " ".join(rng.choice(WORDS) for _ in range(250))
               for i in range(16)]

    async def conversation(c: httpx.AsyncClient, opener: str) -> list[tuple[str, int, int]]:
        msgs, turns = [{"role": "user", "content": opener}], []
        for t in range(4):
            r = await c.post(served.url + "/v1/chat/completions", json={
                "model": served.model, "messages": msgs, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text[:300]
            body = r.json()
            usage = body["usage"]
            turns.append((r.headers[REPLICA_HEADER], usage["prompt_tokens"],
                          usage["prompt_tokens_details"]["cached_tokens"]))
            msgs += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And word {t}?"}]
        return turns

    async def go():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*[conversation(c, o) for o in openers])

    t0 = time.perf_counter()
    convs = asyncio.run(go())
    wall = time.perf_counter() - t0
    later = [turn for conv in convs for turn in conv[1:]]
    hit = sum(cached for _, _, cached in later) / sum(prompt for _, prompt, _ in later)
    homes = [conv[0][0] for conv in convs]
    print(f"16 x 4 turns in {wall:.1f}s; turns 2-4 prefix-cache hit rate {hit:.1%}; conversations per replica "
          f"{sorted(homes.count(r) for r in set(homes))}")
    moved = [(i, [r for r, _, _ in conv]) for i, conv in enumerate(convs) if len({r for r, _, _ in conv}) > 1]
    assert not moved, moved
    assert hit >= 0.9, (hit, later)
    assert len(set(homes)) == 2 and min(homes.count(r) for r in set(homes)) >= 4, homes  # first turns: by load

    m = served.metrics()
    assert sum(m["cluster_router_prefix_affinity_hits_total"]) >= 48
    assert sum(m["cluster_router_routed_requests_total"]) >= 64
    assert len(m["cluster_prefix_cache_hit_tokens_total"]) == 2 and len(m["cluster_prefix_cache_hit_ratio"]) == 2
