"""The `serve`, `client` and `webui` subcommands of `cluster` (registered by cluster.cli via add_serve_args).

    cluster serve [MODEL] [--replicas R] [--tp N] [--api-key KEY] [--address RAY_ADDRESS] [--host H] [--port P]
    cluster serve ... --print-config > app.yaml      # the same application as a Serve config: serve deploy app.yaml
    cluster client http://127.0.0.1:8000 [--api-key KEY]
    cluster webui  http://127.0.0.1:8000 [--port 7860]

`cluster serve` checks the model and the options first (one line and exit 2 on a mistake, before Ray starts), then
starts a local Ray cluster (or joins RAY_ADDRESS / --address), runs the Serve application of
cluster.router:build_app, and serves until SIGTERM or Ctrl-C; then it drains: new requests get 503, requests in
flight finish (up to --shutdown-timeout seconds), and it exits, deleting its application (and stopping the Ray
cluster it started). On a joined cluster it never touches an application it did not create, and serves where
Serve already listens there (Serve's HTTP options are fixed once it runs on a cluster).
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

from cluster.cli_args import add_engine_args, check_model, engine_config_from_args

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def add_serve_args(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API on Ray Serve",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--host", default=None, help=f"where Serve listens (default: {DEFAULT_HOST}; on a joined cluster "
                   "whose Serve already runs: where it listens)")
    p.add_argument("--port", type=int, default=None, help=f"(default: {DEFAULT_PORT}, or as --host says)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (data parallelism)")
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscale between --min-replicas and --max-replicas (Serve's autoscaling_config; default "
                        "min 1 when only --max-replicas is given)")
    p.add_argument("--max-replicas", type=int, default=None, help="see --min-replicas")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling: requests in flight per replica Serve aims at (default: 64)")
    p.add_argument("--autoscaling", action="append", default=None, metavar="KEY=VALUE",
                   help="autoscaling: any other autoscaling_config field, e.g. upscale_delay_s=5, "
                        "downscale_delay_s=60, look_back_period_s=10, metrics_interval_s=2 (repeatable)")
    p.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                   help="an engine replica Serve stops (redeploy, scale-down) finishes its requests this long "
                        "before its workers are killed; the rest move to another replica (default: 60)")
    p.add_argument("--routing", choices=["cache_aware", "pending_work", "serve_default"], default="cache_aware",
                   help="replica choice: the replica holding the longest prefix of the prompt unless it is "
                        "overloaded (cache_aware), least pending work of two (pending_work), or Serve's own")
    p.add_argument("--affinity-margin", type=int, default=None, metavar="TOKENS",
                   help="cache_aware: extra pending work a replica holding the prompt's prefix may carry over the "
                        "least-loaded one and still get the request (default: 2048, or half the least-loaded "
                        "one's work if more)")
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
    p.add_argument("url", nargs="?", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    p.add_argument("--api-key", default=None, help="default: $CLUSTER_API_KEY")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stats", action="store_true", help="print token counts after each answer")
    p.set_defaults(func=client_main)

    p = subparsers.add_parser("webui", help="web chat page against a running server")
    p.add_argument("url", nargs="?", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=webui_main)


# -- serve: what to deploy ----------------------------------------------------------------------------------------
def _serve_args(args: argparse.Namespace, local: bool):
    """ServeArgs of the options, every check done that can be done before Ray starts (a wrong model path is an
    error here, not a replica's failure half a minute later)."""
    from cluster.router import ServeArgs

    ec = engine_config_from_args(args)
    model = args.model
    if model and Path(model).expanduser().exists():
        check_model(model)
        model = str(Path(model).expanduser().resolve())  # Ray's workers run in other directories
    elif local or not model:
        check_model(model)
    else:  # a joined cluster's nodes may have paths this machine has not
        print(f"note: {model} is not on this machine; the Ray cluster's nodes must have it", file=sys.stderr)
    auto = _autoscaling(args)
    most = auto["max_replicas"] if auto else args.replicas
    cpus = args.cpus_per_worker
    if cpus is None:
        on_cpu = ec.device == "cpu" or not _has_gpu()
        cpus = max(1, (os.cpu_count() or 1) // max(1, most * ec.tp)) if (local and on_cpu) else 1
    spec = {"model": model, "name": args.model_name, "replicas": args.replicas, "routing": args.routing,
            "affinity_margin_tokens": args.affinity_margin, "autoscaling_config": auto,
            "engine": ec.model_dump(exclude_defaults=True), "cpus_per_worker": float(cpus),
            "max_waiting": args.max_waiting, "max_queued_requests": args.max_queued_requests,
            "drain_timeout_s": args.drain_timeout}
    spec = {k: v for k, v in spec.items() if v is not None}
    extra = {k: v for k, v in (("max_request_bytes", args.max_request_bytes), ("image_dir", args.image_dir))
             if v is not None}
    if extra.get("image_dir") and not Path(extra["image_dir"]).is_dir():
        raise ValueError(f"--image-dir {extra['image_dir']}: no such directory")
    a = ServeArgs(models=[spec], api_key=args.api_key or os.environ.get("CLUSTER_API_KEY"), **extra)
    a.specs()  # fail here, with a clear message, not inside a replica
    return a


def _autoscaling(args: argparse.Namespace) -> dict | None:
    """ModelSpec.autoscaling_config of --min/--max-replicas and --target-ongoing-requests; None: fixed replicas."""
    extra = _autoscaling_fields(args.autoscaling or [])
    if args.min_replicas is None and args.max_replicas is None:
        if args.target_ongoing_requests is not None or extra:
            flag = "--target-ongoing-requests" if args.target_ongoing_requests is not None else "--autoscaling"
            raise ValueError(f"{flag} needs --max-replicas (and optionally --min-replicas)")
        return None
    if args.replicas != 1:
        raise ValueError("--replicas and --min/--max-replicas are both set: drop --replicas (Serve starts at "
                         "--min-replicas)")
    lo = 1 if args.min_replicas is None else args.min_replicas
    auto = {"min_replicas": lo, "max_replicas": max(lo, 1) if args.max_replicas is None else args.max_replicas}
    if args.target_ongoing_requests is not None:
        auto["target_ongoing_requests"] = args.target_ongoing_requests
    from cluster.deployments.engine import Autoscaling

    return Autoscaling.model_validate({**auto, **extra}).model_dump(exclude_unset=True)  # "5" -> 5.0, checked


def _autoscaling_fields(pairs: list[str]) -> dict:
    """--autoscaling KEY=VALUE pairs as autoscaling_config fields (ModelSpec's Autoscaling checks names and values)."""
    from cluster.deployments.engine import Autoscaling

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise ValueError(f"--autoscaling {pair!r}: write KEY=VALUE, e.g. --autoscaling downscale_delay_s=60")
        if key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            raise ValueError(f"--autoscaling {key}: use --{key.replace('_', '-')} instead")
        if key not in Autoscaling.model_fields:
            known = ", ".join(k for k in Autoscaling.model_fields
                              if k not in ("min_replicas", "max_replicas", "target_ongoing_requests"))
            raise ValueError(f"--autoscaling {key}: no such field (known: {known})")
        out[key] = value.strip()
    return out


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


# -- serve: joining a Ray cluster ---------------------------------------------------------------------------------
def _ray_token() -> tuple[str | None, str]:
    """This machine's Ray auth token and where it is, in Ray's order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token (which `ray.init()` writes when it starts a local cluster, as `cluster serve` does)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None, str(path)
    except OSError:
        return None, str(path)


def _gcs_refusal(address: str, token: str | None):
    """The gRPC status the cluster's GCS answers a GetClusterId with (None: it answered), in milliseconds."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")  # an empty request is a valid one
        try:
            call(b"", timeout=5, metadata=[("authorization", f"Bearer {token}")] if token else None)
        except grpc.RpcError as e:
            return e.code()
    return None


def check_ray_access(address: str) -> None:
    """Before `ray.init(address)`, which retries for half a minute on a cluster it cannot reach or that refuses
    it, then dies in a long traceback: ask the cluster once. Ray 2.60 turns token auth on for a cluster that
    `ray.init()` or `ray start` (with ~/.ray/auth_token present) started, but a driver joining an address given
    to it sends the token only under RAY_AUTH_MODE=token. So when the cluster wants a token and this machine has
    it, turn that mode on (Ray reads it at import: this runs before `import ray`); otherwise fail in one line."""
    if address == "auto" or address.startswith("ray://") or ":" not in address or \
            os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # Ray finds the cluster, Ray Client, no port, TLS: left to ray.init
    import grpc

    mode = (os.environ.get("RAY_AUTH_MODE") or "").lower()
    token, where = _ray_token()
    refused = _gcs_refusal(address, token if mode == "token" else None)
    if refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise RuntimeError(f"no Ray cluster answers at {address}: start one there (`ray start --head`), or leave "
                           "out --address and $RAY_ADDRESS to start a local one")
    if refused != grpc.StatusCode.UNAUTHENTICATED:
        return  # it answered (or something ray.init will explain)
    fix = "copy the head node's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN)"
    if mode == "token":
        raise RuntimeError(f"the Ray cluster at {address} refuses the token in {where}: {fix}" if token else
                           f"the Ray cluster at {address} needs its auth token, and {where} has none: {fix}")
    if not token:
        raise RuntimeError(f"the Ray cluster at {address} uses token authentication and {where} has no token: "
                           f"{fix}")
    if mode:
        raise RuntimeError(f"the Ray cluster at {address} uses token authentication, but RAY_AUTH_MODE={mode}: "
                           "set RAY_AUTH_MODE=token")
    if _gcs_refusal(address, token) is not None:
        raise RuntimeError(f"the Ray cluster at {address} refuses the token in {where}: {fix}")
    os.environ["RAY_AUTH_MODE"] = "token"
    print(f"the Ray cluster at {address} uses token authentication: sending the token in {where}", flush=True)


# -- serve: run ---------------------------------------------------------------------------------------------------
class _Signals:
    """SIGINT / SIGTERM. During start-up they interrupt it at once (KeyboardInterrupt: nothing is serving yet, so
    there is nothing to drain); once serving they start the drain, and a second Ctrl-C stops waiting for it."""

    def __init__(self) -> None:
        self.serving = False
        self.stop = threading.Event()
        self.seen = 0

    def __call__(self, signum, _frame) -> None:
        self.seen += 1
        if not self.serving or (self.seen > 1 and signum == signal.SIGINT):
            raise KeyboardInterrupt
        self.stop.set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)


def serve_main(args: argparse.Namespace) -> int:
    address = args.address or os.environ.get("RAY_ADDRESS")
    a = _serve_args(args, local=not address)
    host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT
    if args.print_config:
        print(serve_config_yaml(a, host, port, args.app_name), end="")
        return 0
    if address:
        check_ray_access(address)  # before `import ray`: it may turn on token auth, which Ray reads at import

    spec = a.specs()[0]
    auto = spec.autoscaling_config
    count = f"{auto.min_replicas}..{auto.max_replicas}" if auto else str(spec.replicas)
    what = (f"application '{args.app_name}': {count} replica(s) of {spec.model or 'the embedded model'}"
            f" (tp {spec.engine.get('tp', 1)})")
    most = auto.max_replicas if auto else spec.replicas
    need = int(spec.cpus_per_worker * most * int(spec.engine.get("tp", 1)) + 0.999)
    num_cpus = max(args.num_cpus or os.cpu_count() or 1, need)
    print(f"joining the Ray cluster at {address} for {what}" if address else
          f"starting a local Ray cluster ({num_cpus} CPUs) for {what}", flush=True)
    signals = _Signals()
    signals.install()

    import logging

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
        # "local": a new cluster even when `ray start` left one this machine would otherwise join
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    signals.install()  # again: ray.init put in its own SIGTERM handler, which ends the process at once
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # we say what happens, once
    created = quick = False
    try:
        print(f"ray: {ray.get_runtime_context().gcs_address}", flush=True)
        host, port = _http_address(args, host, port) if address else (host, port)
        serve.start(http_options={"host": host, "port": port})
        created = True  # from here on the application is ours to delete, whatever happens
        try:
            serve.run(build_app(a), name=args.app_name, route_prefix="/", blocking=False)
        except RuntimeError as e:
            raise RuntimeError(_deploy_failure(args.app_name) or str(e)) from None
        signals.serving = True
        print(f"serving on {_url(host, port)} (models: GET /v1/models); SIGTERM or Ctrl-C to stop", flush=True)
        signals.stop.wait()
        print("shutting down: refusing new requests, letting those in flight finish", flush=True)
        # requests still in flight after --shutdown-timeout: stop without waiting on router_drain_timeout_s (300 s)
        quick = not _drain(args.app_name, args.shutdown_timeout)
    except KeyboardInterrupt:
        quick = True
        print("interrupted: stopping", flush=True)
        raise
    finally:
        _stop(args.app_name, created, local=not address, quick=quick)
    print("stopped", flush=True)
    return 0


def _http_address(args: argparse.Namespace, host: str, port: int) -> tuple[str, int]:
    """Where this application will be served on a joined cluster, or RuntimeError saying why it will not: an
    application of that name or on route / is there already (not ours: left alone), or Serve runs there on another
    host/port than --host/--port asked for."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        print(f"starting Serve on this cluster, listening on {host}:{port}", flush=True)
        return host, port
    details = ServeInstanceDetails(**client.get_serve_details())
    name = args.app_name
    if name in details.applications:
        raise RuntimeError(f"application '{name}' already runs on this Ray cluster; pick another --app-name or "
                           f"remove it: {_removal(name)}")
    http = details.http_options
    if http is not None and ((args.host and args.host != http.host) or (args.port and args.port != http.port)):
        raise RuntimeError(f"Serve already runs on this Ray cluster, listening on {http.host}:{http.port}, and keeps "
                           "its HTTP options until it restarts: leave out --host/--port to serve there")
    for other, app in details.applications.items():
        if app.route_prefix == "/":
            raise RuntimeError(f"application '{other}' already serves route / on this Ray cluster; remove it: "
                               f"{_removal(other)}")
    if http is None:
        return host, port
    print(f"Serve already runs on this cluster, listening on {http.host}:{http.port}: serving there", flush=True)
    return http.host, http.port


def _removal(app: str) -> str:
    """How to remove one application: Ray 2.60's `serve` CLI has no `delete` (`serve shutdown` removes them all)."""
    return f"serve.delete('{app}') from a Ray driver, or `serve shutdown` (every application)"


def _url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/v1"


def _stop(app_name: str, created: bool, local: bool, quick: bool) -> None:
    """Delete our application (never another's), then leave Ray (stopping the cluster we started). Serve itself is
    not shut down: serve.shutdown() kills its controller while our call to it is in flight, and Ray then logs
    "Task ServeController.graceful_shutdown failed ... will be retried" on every clean stop. After an interrupted
    start-up on our own cluster there is nothing to keep: ray.shutdown() alone ends it in seconds."""
    import ray
    from ray import serve

    try:
        if created and not (local and quick):
            try:
                serve.delete(app_name, _blocking=not quick)
            except Exception as e:  # noqa: BLE001 - leaving regardless
                print(f"could not delete application '{app_name}': {str(e).splitlines()[0] if str(e) else e!r}",
                      file=sys.stderr, flush=True)
    finally:
        ray.shutdown()


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


def _drain(app_name: str, timeout: float) -> bool:
    """Refuse new requests, wait up to `timeout` for those in flight; True when none is left."""
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
        return not left
    except Exception as e:  # noqa: BLE001 - shutting down regardless
        print(f"drain failed: {e}", file=sys.stderr, flush=True)
        return False


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
