"""The serving path's typed messages: the one merge of deltas, worker names, and a router that holds no torch."""
import pickle
import subprocess
import sys

from cluster.deployments.naming import WorkerNames
from cluster.messages import Delta, Deltas, TokenLogprob


def test_delta_merge_folds_a_later_output_in():
    lp = TokenLogprob("a", 1, -0.5, [("a", -0.5)])
    acc = Delta("x", [1], [lp], None, input_token_len=3, generate_token_len=1, cached_token_len=2)
    acc.merge(Delta("y", [2], None, None, 0, 2, 2)).merge(Delta("z", [3], [lp], "length", 3, 3, 0))
    assert (acc.text, acc.token_ids, acc.logprobs, acc.finish_reason) == ("xyz", [1, 2, 3], [lp, lp], "length")
    assert (acc.input_token_len, acc.generate_token_len, acc.cached_token_len) == (3, 3, 0)
    first = Delta("a", [1])
    copy = first.copy().merge(Delta("b", [2]))
    assert (first.text, first.token_ids) == ("a", [1]), "copy() must not share the original's lists"
    assert copy.text == "ab"


def test_messages_cross_processes_by_pickle():
    ev = Deltas({0: Delta("hi", [5], [TokenLogprob("hi", 5, -0.1)], "stop", 2, 1)})
    assert pickle.loads(pickle.dumps(ev)) == ev


def test_worker_names_round_trip():
    names = WorkerNames("app", "engine-x", "abc123", 3)
    assert WorkerNames.parse(names.of_rank(0)) == (0, names)
    assert WorkerNames.parse(names.of_rank(7)) == (7, names)
    for other in ("SERVE_REPLICA::x", "cluster-rankX|a|b|c|1", "cluster-rank0|a|b|c", "cluster-rank0|a|b|c|z"):
        assert WorkerNames.parse(other) is None


def test_the_router_process_imports_no_torch():
    code = ("import sys\n"
            "import cluster.router, cluster.deployments.engine\n"
            "from cluster.serving.app import create_app\n"
            "from cluster.serving.server import OpenAIServer\n"
            "create_app(OpenAIServer([]))\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers')))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
