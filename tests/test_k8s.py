"""The deployment files in k8s/, checked the way a cluster would check them, offline: every RayService / RayCluster
strictly against the KubeRay v1.7.0 CRDs in ../shared/kuberay (an unknown field is an error, as it is for
`kubectl apply --validate=strict`), every Serve config (a RayService's serveConfigV2, k8s/serve_config.yaml) against
Serve's schema and cluster.router.ServeArgs / ModelSpec, and the sizing of the pods against the replicas they must
hold. Also the explicit GPU use of a replica: GPU bundles when asked, and a logged wait for them."""
from __future__ import annotations

import asyncio
import copy
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERAY = ROOT.parent / "shared" / "kuberay"
# k8s objects without a CRD here: allowed kinds, checked for their identity only
CORE_KINDS = {("v1", "PersistentVolumeClaim"), ("v1", "Secret"), ("v1", "ConfigMap"), ("batch/v1", "Job")}
OBJECT_META = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                              "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                              "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
SERVE_CONFIG_FOR = {"raycluster.yaml": "serve_config.yaml"}  # a RayCluster -> the config `serve deploy` sends it
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 36k lines: 2 s instead of 20


# -- the CRDs, made strict ------------------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """An openAPIV3Schema as the API server applies it: no unknown fields where properties are listed (unless
    x-kubernetes-preserve-unknown-fields), int-or-string as either."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: (v if k == "enum" else strict(v)) for k, v in schema.items()}
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return s


def _load_crds() -> dict[tuple[str, str], dict]:
    crds = {}
    for f in sorted(KUBERAY.glob("crd_*.yaml")):
        crd = yaml.load(f.read_text(), Loader=LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = strict(v["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            crds[(f"{group}/{v['name']}", kind)] = schema
    return crds


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict]:
    if not KUBERAY.is_dir():
        pytest.skip(f"{KUBERAY} is absent: the KubeRay CRDs (shared/kuberay beside the checkout) are needed")
    found = _load_crds()
    assert found, f"no crd_*.yaml in {KUBERAY}"
    return found


def crd_errors(doc: dict, crds: dict) -> list[str]:
    schema = crds.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no CRD for {doc.get('apiVersion')} {doc.get('kind')}"]
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


# -- the files -------------------------------------------------------------------------------------------------------
def documents() -> Iterator[tuple[str, dict]]:
    for f in sorted(K8S.rglob("*.y*ml")):
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if doc is not None:
                yield f"{f.relative_to(K8S)}#{i}", doc


def serve_configs() -> Iterator[tuple[str, dict]]:
    """Every Serve config: the serveConfigV2 of each RayService and the stand-alone ones."""
    for name, doc in documents():
        if doc.get("kind") == "RayService":
            yield f"{name} serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])
        elif "applications" in doc:
            yield name, doc


def serve_config_errors(config: dict) -> list[str]:
    """Serve's own schema (its unknown keys too: Ray's models ignore them) and, for our application, ServeArgs with
    every ModelSpec (both extra=forbid)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from cluster.router import ServeArgs

    errors = [f"unknown Serve config key {k!r}" for k in config if k not in ServeDeploySchema.model_fields]
    for app in config.get("applications", []):
        errors += [f"unknown application key {k!r}" for k in app if k not in ServeApplicationSchema.model_fields]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        errors.append(str(e))
    for app in config.get("applications", []):
        if app.get("import_path") != "cluster.router:build_app":
            errors.append(f"application {app.get('name')}: import_path is not cluster.router:build_app")
            continue
        try:
            ServeArgs.model_validate(app.get("args") or {}).specs()
        except (ValidationError, ValueError) as e:
            errors.append(f"application {app.get('name')} args: {e}")
    return errors


def test_every_manifest_matches_its_crd(crds):
    seen = set()
    for name, doc in documents():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in crds:
            seen.add(key[1])
            assert not crd_errors(doc, crds), f"{name}:\n" + "\n".join(crd_errors(doc, crds))
        elif key in CORE_KINDS:
            assert doc.get("metadata", {}).get("name") and isinstance(doc.get("spec"), dict), name
        else:
            assert "applications" in doc, f"{name}: neither a known Kubernetes kind nor a Serve config: {key}"
    assert {"RayService", "RayCluster"} <= seen


def test_every_serve_config_matches_serve_args():
    configs = list(serve_configs())
    assert len(configs) >= 2
    for name, config in configs:
        assert not serve_config_errors(config), f"{name}:\n" + "\n".join(serve_config_errors(config))


def _doc(kind: str) -> dict:
    return copy.deepcopy(next(d for _, d in documents() if d.get("kind") == kind))


def test_a_typo_fails_both_checks(crds):
    svc = _doc("RayService")
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1  # not minReplicas
    assert any("minReplica" in e for e in crd_errors(bad, crds))
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelectr"] = {"a": "b"}
    assert any("nodeSelectr" in e for e in crd_errors(bad, crds))
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert crd_errors(bad, crds)
    bad = copy.deepcopy(svc)
    bad["metadata"]["nmae"] = "x"
    assert any("nmae" in e for e in crd_errors(bad, crds))
    cluster = _doc("RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert crd_errors(cluster, crds)

    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    for mutate, word in [(lambda m: m.update(use_gpus=True), "use_gpus"),
                         (lambda m: m["engine"].update(tp_size=2), "tp_size"),
                         (lambda m: m["autoscaling_config"].update(max_replica=4), "max_replica"),
                         (lambda m: m.update(replicas=2), "replicas and autoscaling_config")]:
        bad = copy.deepcopy(config)
        mutate(bad["applications"][0]["args"]["models"][0])
        assert any(word in e for e in serve_config_errors(bad)), word
    bad = copy.deepcopy(config)
    bad["applications"][0]["args"]["api_keys"] = "x"
    assert any("api_keys" in e for e in serve_config_errors(bad))
    bad = copy.deepcopy(config)
    bad["proxy_locaton"] = "EveryNode"
    assert any("proxy_locaton" in e for e in serve_config_errors(bad))


# -- the sizing: pods hold the replicas Serve may ask for --------------------------------------------------------------
def _cpu(q: str | int) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _pairs() -> Iterator[tuple[str, dict, dict]]:
    for name, doc in documents():
        if doc.get("kind") == "RayService":
            yield name, doc["spec"]["rayClusterConfig"], yaml.safe_load(doc["spec"]["serveConfigV2"])
        elif doc.get("kind") == "RayCluster":
            file = SERVE_CONFIG_FOR[name.split("#")[0]]
            yield name, doc["spec"], yaml.safe_load((K8S / file).read_text())


def test_gpu_pods_fit_the_replicas_and_gpu_use_is_explicit():
    from cluster.router import ServeArgs

    pairs = list(_pairs())
    assert len(pairs) >= 2
    for name, cluster, config in pairs:
        assert cluster["enableInTreeAutoscaling"] is True, name
        assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: the head runs no model"
        groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert groups, f"{name}: no GPU worker group"
        for g in groups:
            pod = g["template"]["spec"]
            assert pod.get("nodeSelector") and pod.get("tolerations"), f"{name}: GPU nodes are selected explicitly"
            res = pod["containers"][0]["resources"]
            assert res["limits"] == res["requests"], f"{name}: requests = limits, so Ray sees what k8s reserves"
            gpus, cpus = int(res["limits"]["nvidia.com/gpu"]), _cpu(res["limits"]["cpu"])
            mounts = {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])}
            for app in config["applications"]:
                for spec in ServeArgs.model_validate(app["args"]).specs():
                    tp, what = int(spec.engine.get("tp", 1)), f"{name} {spec.name}"
                    assert spec.use_gpu is True, f"{what}: use_gpu must be explicit on GPU nodes"
                    assert gpus % tp == 0, f"{what}: {gpus} GPUs per pod is no multiple of tp {tp}"
                    per_pod = gpus // tp
                    assert cpus >= per_pod * tp * spec.cpus_per_worker + 1, f"{what}: pod cpu too small"
                    auto = spec.autoscaling_config
                    assert auto is not None, f"{what}: replicas autoscale (that drives the KubeRay autoscaler)"
                    assert auto.max_replicas <= g["maxReplicas"] * per_pod, f"{what}: maxReplicas too small"
                    assert auto.target_ongoing_requests <= spec.engine.get("max_batch_size", 128), what
                    assert any(spec.model.startswith(m + "/") for m in mounts), f"{what}: model not on a volume"


def test_image_and_versions_are_pinned():
    """The Ray of the image is the manifests' rayVersion; torch is pinned to a CUDA build; `make image` builds."""
    docker = (K8S / "Dockerfile").read_text()
    ray_tag = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py\d+-cu(\d+)", docker, re.M)
    assert ray_tag, "the base image is a tagged Ray CUDA image"
    torch_v = re.search(r"ARG TORCH_VERSION=(\S+)", docker).group(1)
    index = re.search(r"ARG TORCH_INDEX=(\S+)", docker).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch_v) and index.endswith("/cu" + ray_tag.group(2)), (torch_v, index)
    assert f"ray=={ray_tag.group(1)}" in (K8S / "constraints.txt").read_text()
    for _, cluster, _ in _pairs():
        assert cluster["rayVersion"] == ray_tag.group(1)
    assert re.search(r"^image:", (ROOT / "Makefile").read_text(), re.M)


# -- explicit GPU use in the code ------------------------------------------------------------------------------------
def test_use_gpu_true_never_falls_back_to_cpu(monkeypatch):
    import ray

    from cluster.deployments.engine import ModelSpec
    from cluster.workers.group import GroupSpec

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})  # the GPU node has not joined yet
    spec = ModelSpec(use_gpu=True, engine={"tp": 2}, cpus_per_worker=4).group_spec()
    assert spec.gpu() and spec.bundles() == [{"GPU": 1.0, "CPU": 4.0}] * 2
    assert not GroupSpec(None).gpu()  # None: decided from the cluster, as before
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert GroupSpec(None).gpu() and not GroupSpec(None, use_gpu=False).gpu()
    with pytest.raises(ValueError, match="device"):
        ModelSpec(use_gpu=True, engine={"device": "cpu"})


def test_a_replica_waits_for_its_gpus_and_says_so(monkeypatch, caplog):
    import ray

    from cluster.workers.group import GroupSpec, GroupStartError, wait_placed

    class NeverPlaced:
        def ready(self):
            return asyncio.get_running_loop().create_future()

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 12.0})
    spec = GroupSpec("/models/m", {"tp": 2}, use_gpu=True, cpus_per_worker=4.0, placement_timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="cluster.workers.group"):
        with pytest.raises(GroupStartError, match="GPU 0 free of 0"):
            asyncio.run(wait_placed(NeverPlaced(), spec, spec.bundles(), first_log_s=0.1, log_every_s=0.15))
    lines = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(lines) >= 2 and "2 bundle(s) of {'GPU': 1.0, 'CPU': 4.0}" in lines[0] and "GPU 0 free of 0" in lines[0]


def test_autoscaling_reaches_serve_deployment_options():
    from cluster.router import ServeArgs, build_app

    config = yaml.safe_load(next(d for _, d in documents() if d.get("kind") == "RayService")["spec"]["serveConfigV2"])
    app = build_app(ServeArgs.model_validate(config["applications"][0]["args"]))
    engine = app._bound_deployment.init_args[1]._bound_deployment
    auto = engine._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 96)
    fixed = build_app(ServeArgs(models=[{"replicas": 3}]))._bound_deployment.init_args[1]._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None


# -- the Grafana dashboard reads only what /metrics exports -----------------------------------------------------------
DASHBOARD = K8S / "grafana" / "cluster-dashboard.json"


def _promql(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_dashboard_series_are_exported(anyio_backend):
    """Every series (and every label it groups or filters by) of the dashboard's PromQL is in /metrics of the real
    router app over the replica core and worker host (fake engine, no Ray), after one request."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from test_router_protocol import chat_body, make_client

    dashboard = json.loads(DASHBOARD.read_text())
    c = await make_client()
    try:
        assert (await c.post("/v1/chat/completions", json=chat_body(stream=True))).status_code == 200
        text = (await c.get("/metrics")).text
    finally:
        c.engine.shutdown()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    exprs = _promql(dashboard)
    assert len(exprs) >= 15
    wanted = {"ttft": "cluster_time_to_first_token_seconds_bucket", "tpot": "cluster_time_per_output_token_seconds_bucket",
              "throughput": "cluster_generation_tokens_total", "kv": "cluster_kv_cache_usage_ratio",
              "queue": "cluster_requests_waiting", "preemptions": "cluster_preemptions_total",
              "per-replica load": "cluster_requests_running"}
    for what, series in wanted.items():
        assert any(series in e for e in exprs), f"the dashboard shows no {what} ({series})"
    for e in exprs:
        names = set(re.findall(r"\b(cluster_[a-z0-9_]+)\b", e))
        assert names, e
        for n in names:
            assert n in labels, f"{n} (in {e}) is not exported by /metrics"
        used = set(re.findall(r"(\w+)\s*=~?", e)) | {x.strip() for g in re.findall(r"by \(([^)]*)\)", e)
                                                     for x in g.split(",")}
        have = set().union(*(labels[n] for n in names)) | {"le"}
        assert used <= have, f"{e}: labels {used - have} are not on {names}"
