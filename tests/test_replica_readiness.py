"""A replica that cannot serve for a while (rebuilding its workers after a death, shutting down in a redeploy or a
scale-down) costs no request that has not started yet: the request routers skip a replica whose routing stats say
it is not ready, and the router tries a request again when a replica refused it for its own reasons (not the
request's). Fast: fake replicas and a fake backend, no Ray (bench_serving.py --fault kill-replica once lost 20 of
64 requests to a recovering replica's instant 503s)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import cluster.serving.server as server_mod
from cluster.messages import Choice, ErrorInfo, Failed, Job, Started
from cluster.protocol import APIError
from cluster.serving.backends import EventStream
from cluster.serving.failover import MAX_MOVES
from cluster.serving.replica_choice import excluding
from cluster.serving.server import OpenAIServer


def _replica(uid: str, state: str | None):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid),
                           routing_stats={} if state is None else {"state": state})


def test_routers_skip_replicas_that_are_not_ready():
    a, b, c = _replica("a", "ready"), _replica("b", "recovering"), _replica("c", None)  # c: no stats yet
    assert excluding([a, b, c], None) == [a, c]
    assert excluding([a, b, c], Job("j", [], exclude_replicas=["a"])) == [c]
    assert excluding([a, b], Job("j", [], exclude_replicas=["a"])) == [a]  # the only ready one, though it failed
    assert excluding([b], None) == [b]  # none ready: all, one may be back by now


class Refusing:
    """A backend whose first `refusals` attempts get `error` as the first event, then a Started."""

    name = "fake"

    def __init__(self, refusals: int, error: ErrorInfo):
        self.refusals, self.error, self.jobs = refusals, error, []

    def generate(self, job: Job) -> EventStream:
        self.jobs.append(job)
        refuse = len(self.jobs) <= self.refusals

        async def events():
            yield Failed(self.error) if refuse else Started({0: 3}, "r2")
        return EventStream(events())


def _job() -> Job:
    return Job("cmpl-1", [Choice(0, "hi", {"max_new_tokens": 4})])


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(server_mod, "RETRY_DELAY_S", 0.01)


def test_a_refusal_of_the_replica_is_tried_again():
    backend = Refusing(2, ErrorInfo("unavailable", "engine replica is recovering; retry shortly", retry_after=5))
    events, first = asyncio.run(OpenAIServer([backend])._start(backend, _job()))
    assert isinstance(first, Started) and first.replica == "r2"
    assert [j.request_id for j in backend.jobs] == ["cmpl-1", "cmpl-1-r1", "cmpl-1-r2"]


def test_no_replica_taking_it_is_a_503_after_the_retries():
    backend = Refusing(99, ErrorInfo("engine_dead", "engine replica failed; retry", retry_after=5))
    with pytest.raises(APIError) as e:
        asyncio.run(OpenAIServer([backend])._start(backend, _job()))
    assert e.value.status == 503 and len(backend.jobs) == MAX_MOVES + 1


def test_the_request_s_own_error_is_not_tried_again():
    backend = Refusing(99, ErrorInfo("bad_request", "token id 99999 is not in the vocabulary", param="prompt"))
    with pytest.raises(APIError) as e:
        asyncio.run(OpenAIServer([backend])._start(backend, _job()))
    assert e.value.status == 400 and len(backend.jobs) == 1
