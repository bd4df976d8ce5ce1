"""The `serve`, `client` and `webui` subcommands of `cluster` (registered by cluster.cli via add_serve_args).

    cluster serve [MODEL] [--replicas R] [--tp N] [--api-key KEY] [--address RAY_ADDRESS] [--host H] [--port P]
    cluster serve ... --print-config > app.yaml      # the same application as a Serve config: serve deploy app.yaml
    cluster client http://127.0.0.1:8000 [--api-key KEY]
    cluster webui  http://127.0.0.1:8000 [--port 7860]

`cluster serve` starts a local Ray cluster (or joins RAY_ADDRESS / --address), runs the Serve application of
cluster.router:build_app, and serves until SIGTERM or Ctrl-C; then it drains: new requests get 503, requests in
flight finish (up to --shutdown-timeout seconds), and it exits (deleting the application when it joined a cluster
it did not start; shutting Serve and Ray down when it started them).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    from cluster.cli import add_engine_args

    add_engine_args(p)


def add_serve_args(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API on Ray Serve",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (data parallelism)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the engine's model name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $CLUSTER_API_KEY)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: 16 MiB)")
    p.add_argument("--image-dir", default=None,
                   help="let image_url name files under this directory (relative to it); by default HTTP callers "
                        "send images inline as data: URLs only")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a Ray cluster started here")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker actor (default: 1 on GPUs / joined clusters, a share of this machine's "
                        "cores otherwise)")
    p.add_argument("--max-waiting", type=int, default=4096, help="engine queue length beyond which requests get 503")
    p.add_argument("--max-queued-requests", type=int, default=4096,
                   help="requests waiting for a busy replica beyond which requests get 503 (-1: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish")
    p.add_argument("--app-name", default="cluster")
    p.add_argument("--print-config", action="store_true", help="print the equivalent Serve config YAML and exit")
    p.set_defaults(func=serve_main)

    p = subparsers.add_parser("client", help="terminal chat against a running server")
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="default: $CLUSTER_API_KEY")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stats", action="store_true", help="print token counts after each answer")
    p.set_defaults(func=client_main)

    p = subparsers.add_parser("webui", help="web chat page against a running server")
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=webui_main)


# -- serve -------------------------------------------------------------------------------------------------------
def _serve_args(args: argparse.Namespace, local: bool):
    from cluster.cli import engine_config_from_args
    from cluster.router import ServeArgs

    ec = engine_config_from_args(args)
    cpus = args.cpus_per_worker
    if cpus is None:
        on_cpu = ec.device == "cpu" or not _has_gpu()
        cpus = max(1, (os.cpu_count() or 1) // max(1, args.replicas * ec.tp)) if (local and on_cpu) else 1
    spec = {"model": args.model, "name": args.model_name, "replicas": args.replicas,
            "engine": ec.model_dump(exclude_defaults=True), "cpus_per_worker": float(cpus),
            "max_waiting": args.max_waiting, "max_queued_requests": args.max_queued_requests}
    spec = {k: v for k, v in spec.items() if v is not None}
    extra = {k: v for k, v in (("max_request_bytes", getattr(args, "max_request_bytes", None)),
                                ("image_dir", getattr(args, "image_dir", None))) if v is not None}
    if extra.get("image_dir") and not Path(extra["image_dir"]).is_dir():
        raise SystemExit(f"--image-dir {extra['image_dir']}: no such directory")
    a = ServeArgs(models=[spec], api_key=args.api_key or os.environ.get("CLUSTER_API_KEY"), **extra)
    a.specs()  # fail here, with a clear message, not inside a replica
    return a


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def serve_config_yaml(a, host: str, port: int, app_name: str = "cluster") -> str:
    import yaml

    cfg = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": app_name, "route_prefix": "/", "import_path": "cluster.router:build_app",
                             "args": a.model_dump(exclude_defaults=True, exclude={"api_key"})}]}
    return yaml.safe_dump(cfg, sort_keys=False)


def _source_root() -> str | None:
    """The checkout holding `cluster` when it is not pip-installed (Ray's workers must import it too)."""
    import cluster

    root = Path(cluster.__file__).resolve().parent.parent
    return None if "site-packages" in root.parts else str(root)


def serve_main(args: argparse.Namespace) -> int:
    address = args.address or os.environ.get("RAY_ADDRESS")
    a = _serve_args(args, local=not address)
    if args.print_config:
        print(serve_config_yaml(a, args.host, args.port, args.app_name), end="")
        return 0

    stop = threading.Event()
    signals = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
        stop.set()

    import ray
    from ray import serve

    from cluster.router import build_app

    root = _source_root()
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        x for x in (root, os.environ.get("PYTHONPATH")) if x)}} if root else None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
    else:
        if root:  # the local cluster's processes inherit this environment
            os.environ["PYTHONPATH"] = runtime_env["env_vars"]["PYTHONPATH"]
        spec = a.specs()[0]
        need = int(spec.cpus_per_worker * spec.replicas * int(spec.engine.get("tp", 1)) + 0.999)
        ray.init(num_cpus=max(args.num_cpus or os.cpu_count() or 1, need), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    try:
        # after ray.init: Ray installs its own handlers, which would end this process at once
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(f"ray: {ray.get_runtime_context().gcs_address}", flush=True)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(build_app(a), name=args.app_name, route_prefix="/", blocking=False)
        except RuntimeError as e:
            raise RuntimeError(_deploy_failure(args.app_name) or str(e)) from None
        print(f"serving on http://{args.host}:{args.port}/v1 (models: GET /v1/models); SIGTERM or Ctrl-C to stop",
              flush=True)
        while not stop.wait(0.5):
            pass
        print("shutting down: refusing new requests, letting those in flight finish", flush=True)
        _drain(args.app_name, args.shutdown_timeout)
    finally:
        try:
            if address:
                serve.delete(args.app_name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    print("stopped", flush=True)
    return 0


def _deploy_failure(app_name: str) -> str | None:
    """The replica's own error (e.g. "ValueError: tp=2 does not divide this model ...") rather than Serve's
    "Failed to update the deployments"."""
    from ray import serve

    try:
        app = serve.status().applications[app_name]
    except Exception:  # noqa: BLE001
        return None
    for name, dep in app.deployments.items():
        msg = (dep.message or "").strip()
        if "Error" in msg:
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
            return f"deployment {name} failed: {(errs or lines)[-1]}"
    return None


def _drain(app_name: str, timeout: float) -> None:
    from ray import serve

    try:
        h = serve.get_app_handle(app_name)
        left = h.drain.remote().result(timeout_s=10)
        deadline = time.monotonic() + timeout
        while left > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            left = h.num_in_flight.remote().result(timeout_s=10)
        if left:
            print(f"{left} request(s) still in flight after {timeout:.0f}s; stopping anyway", flush=True)
    except Exception as e:  # noqa: BLE001 - shutting down regardless
        print(f"drain failed: {e}", file=sys.stderr, flush=True)


# -- client, webui ------------------------------------------------------------------------------------------------
def client_main(args: argparse.Namespace) -> int:
    from cluster.client import APIClient, chat_loop

    client = APIClient(args.url, args.api_key or os.environ.get("CLUSTER_API_KEY"))
    try:
        return chat_loop(client, args.model, args.system, args.stats, max_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p)
    finally:
        client.close()


def webui_main(args: argparse.Namespace) -> int:
    from cluster.deployments.webui import serve_webui

    serve_webui(args.url, args.host, args.port)
    return 0
