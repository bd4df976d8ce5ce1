"""`cluster serve`'s replica options reach the Serve application it builds: --min/--max-replicas,
--target-ongoing-requests and --autoscaling KEY=VALUE as the engine deployment's autoscaling_config, --routing /
--affinity-margin as its request router, --drain-timeout (and router_drain_timeout_s) as the deployments'
graceful shutdown bounds. Nothing starts: the config is printed and built (no Ray cluster)."""
from __future__ import annotations

import pytest
import yaml

from cluster.cli import main
from cluster.router import build_app


def _app(capsys, *flags: str):
    """(the printed config's model spec, the application build_app makes of it)."""
    from test_router_clients import _app_args_of

    assert main(["serve", "--print-config", *flags]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    return cfg["applications"][0]["args"]["models"][0], build_app(_app_args_of(cfg))


def _built(capsys, *flags: str):
    """(the printed config's model spec, the engine deployment build_app makes of it)."""
    spec, app = _app(capsys, *flags)
    return spec, app._bound_deployment.init_args[1]._bound_deployment


def test_autoscaling_flags_reach_the_deployment(capsys):
    spec, engine = _built(capsys, "--min-replicas", "2", "--max-replicas", "5", "--target-ongoing-requests", "24")
    assert spec["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 24.0}
    auto = engine._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 24)

    spec, engine = _built(capsys, "--max-replicas", "3")  # min defaults to 1, the target to ModelSpec's 64
    auto = engine._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 64)

    spec, engine = _built(capsys, "--replicas", "3")
    assert "autoscaling_config" not in spec
    assert engine.num_replicas == 3 and engine._deployment_config.autoscaling_config is None


def test_routing_flags_reach_the_request_router(capsys):
    _, engine = _built(capsys, "--affinity-margin", "512")
    router = engine._deployment_config.request_router_config
    assert router.request_router_class.endswith("CacheAwareRouter")
    assert router.request_router_kwargs == {"deployment": "engine-default", "margin_tokens": 512}
    _, engine = _built(capsys, "--routing", "pending_work")
    assert engine._deployment_config.request_router_config.request_router_class.endswith("PendingWorkRouter")


def test_contradicting_replica_flags_fail_fast(capsys):
    assert main(["serve", "--print-config", "--replicas", "2", "--max-replicas", "4"]) == 2
    assert "drop --replicas" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "min_replicas 3 > max_replicas 2" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--target-ongoing-requests", "8"]) == 2
    assert "needs --max-replicas" in capsys.readouterr().err


def test_autoscaling_fields_reach_the_deployment(capsys):
    spec, engine = _built(capsys, "--max-replicas", "2", "--autoscaling", "upscale_delay_s=1",
                          "--autoscaling", "downscale-delay-s=4", "--autoscaling", "look_back_period_s=3",
                          "--autoscaling", "metrics_interval_s=1")
    assert spec["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                                          "downscale_delay_s": 4.0, "metrics_interval_s": 1.0,
                                          "look_back_period_s": 3.0}
    auto = engine._deployment_config.autoscaling_config
    assert (auto.upscale_delay_s, auto.downscale_delay_s, auto.look_back_period_s) == (1, 4, 3)


def test_bad_autoscaling_fields_fail_fast(capsys):
    assert main(["serve", "--print-config", "--autoscaling", "upscale_delay_s=1"]) == 2
    assert "--autoscaling needs --max-replicas" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--max-replicas", "2", "--autoscaling", "upscale_dealy_s=1"]) == 2
    assert "no such field (known: initial_replicas, upscale_delay_s" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--max-replicas", "2", "--autoscaling", "max_replicas=3"]) == 2
    assert "use --max-replicas instead" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--max-replicas", "2", "--autoscaling", "look_back_period_s=5"]) == 2
    assert "must exceed metrics_interval_s 10" in capsys.readouterr().err
    assert main(["serve", "--print-config", "--max-replicas", "2", "--autoscaling", "upscale_delay_s"]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_drain_bounds_reach_both_deployments(capsys):
    from cluster.router import FAILOVER_MARGIN_S, ROUTER_DRAIN_TIMEOUT_S, ServeArgs

    spec, app = _app(capsys, "--drain-timeout", "12")
    engine = app._bound_deployment.init_args[1]._bound_deployment
    assert spec["drain_timeout_s"] == 12
    assert engine._deployment_config.graceful_shutdown_timeout_s == 12
    assert app._bound_deployment._deployment_config.graceful_shutdown_timeout_s == ROUTER_DRAIN_TIMEOUT_S
    with pytest.raises(ValueError, match="raise router_drain_timeout_s or lower drain_timeout_s"):
        ServeArgs(models=[{"drain_timeout_s": 100}], router_drain_timeout_s=100 + FAILOVER_MARGIN_S - 1).specs()
