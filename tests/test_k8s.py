"""The Kubernetes manifests under k8s/, as rendered by `kubectl kustomize`: what every cluster gets.

Every entry point is rendered (the per-cloud overlays, the laptop overlay, the batch Jobs, the ServiceMonitor
example) and checked for what the deployment relies on: resources, probes and a hardened securityContext on
every container, GPU tolerations, headless Services, one set of port numbers shared by Services, probes,
NetworkPolicies and the containers' flags, and batch sharding that covers every image exactly once.
`k8s/validate.sh` (run here too) checks every object against the Kubernetes schemas with --strict, then the
deployment policy of `k8s/policy.py`; the policy's rules are shown here to fail on the faults they exist for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from client.sharding import shard, shard_indices, shard_size

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")

GPU_OVERLAYS = ["overlays/gke", "overlays/eks", "overlays/aks"]
OVERLAYS = [*GPU_OVERLAYS, "overlays/dev-cpu"]
BATCH = ["batch/extract", "batch/extract-bucket", "batch/assemble-bundle"]
ALL_TARGETS = [*OVERLAYS, *BATCH, "examples/gke-with-servicemonitor", "examples/gke-with-bundle-image"]
SERVICES = {"localizer", "learner", "evaluator"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
SERVER_KINDS = ("Deployment", "StatefulSet")
# Volume types the `restricted` Pod Security Standard allows (the overlays' namespaces enforce it); `image`
# volumes from Kubernetes 1.33 on.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                      "projected", "secret"}

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with Kustomize) is not installed")


# ------------------------------------------------------------------------------------------------------------
# sharding: pure arithmetic, no kubectl needed
# ------------------------------------------------------------------------------------------------------------
def test_shards_cover_every_item_exactly_once():
    for n in range(0, 41):
        items = [f"img{i}.jpg" for i in range(n)]
        for count in range(1, 46):  # includes count > n: some shards are empty
            shards = [shard(items, i, count) for i in range(count)]
            seen = Counter(item for s in shards for item in s)
            assert set(seen) == set(items) and all(c == 1 for c in seen.values()), (n, count)
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1, (n, count, sizes)
            assert sizes == [shard_size(n, i, count) for i in range(count)]
            for i, s in enumerate(shards):
                assert s == [items[j] for j in shard_indices(n, i, count)]
                assert s == sorted(s, key=items.index)  # manifest order kept within a shard


def test_shard_is_stable_and_accepts_any_sequence():
    assert shard(range(10), 1, 3) == [1, 4, 7]
    assert shard(("a", "b"), 3, 4) == []
    assert shard([], 0, 1) == []
    assert shard("abcdef", 0, 2) == ["a", "c", "e"]


@pytest.mark.parametrize(
    ("index", "count", "message"),
    [(0, 0, "at least 1"), (-1, 3, "in \\[0, 3\\)"), (3, 3, "in \\[0, 3\\)"), (5, 2, "got 5"), (0, -2, "at least 1")],
)
def test_shard_rejects_bad_index_or_count(index, count, message):
    with pytest.raises(ValueError, match=message):
        shard([1, 2, 3], index, count)


def test_shard_rejects_non_integers():
    with pytest.raises(TypeError):
        shard([1], "0", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shard([1], 0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shard_indices(-1, 0, 1)


# ------------------------------------------------------------------------------------------------------------
# rendering helpers
# ------------------------------------------------------------------------------------------------------------
def render_dir(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with Kustomize) is not installed")
    return {target: render_dir(K8S / target) for target in ALL_TARGETS}


def of_kind(objs, *kinds):
    return [o for o in objs if o["kind"] in kinds]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(obj)
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def server_workloads(objs) -> list[dict]:
    return of_kind(objs, *SERVER_KINDS)


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def main_container(obj: dict) -> dict:
    (c,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == component(obj)]
    return c


def flags(container: dict) -> dict[str, str]:
    """`--name=value` args as a dict (every flag in our manifests uses the `=` form)."""
    out = {}
    for arg in container.get("args", []):
        m = re.fullmatch(r"--([a-z0-9-]+)(?:=(.*))?", arg)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else ""
    return out


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def expand(text: str, container: dict) -> str:
    """Kubernetes' `$(VAR)` expansion of args from the container's literal env values."""
    return re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", lambda m: env_value(container, m.group(1)) or m.group(0), text)


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are used here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return p


# ------------------------------------------------------------------------------------------------------------
# the whole set validates against the Kubernetes schemas
# ------------------------------------------------------------------------------------------------------------
@needs_kubectl
def test_validate_script_passes():
    out = subprocess.run([str(K8S / "validate.sh")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, f"k8s/validate.sh failed:\n{out.stdout}\n{out.stderr}"
    assert "ok:" in out.stdout and "k8s/policy.py: ok" in out.stdout
    # The CRD (no bundled schema) is reported as skipped, never silently passed.
    assert "skip" in out.stdout and "ServiceMonitor" in out.stdout


@needs_kubectl
def test_validate_script_fails_on_a_misspelt_apiversion(tmp_path):
    bad = tmp_path / "k8s"
    shutil.copytree(K8S, bad)
    pdb = bad / "base" / "pdb.yaml"
    pdb.write_text(pdb.read_text().replace("apiVersion: policy/v1", "apiVersion: policy/v2", 1))
    out = subprocess.run([str(bad / "validate.sh")], capture_output=True, text=True, timeout=120,
                         env={"PATH": str(Path(KUBECTL).parent) + ":/usr/bin:/bin",
                              "KUBERNETES_VALIDATE": str(ROOT / ".venv/bin/kubernetes-validate")
                              if (ROOT / ".venv/bin/kubernetes-validate").exists()
                              else shutil.which("kubernetes-validate") or "kubernetes-validate"})
    assert out.returncode != 0
    assert "policy/v2" in out.stderr


# ------------------------------------------------------------------------------------------------------------
# every container: resources, probes, hardened securityContext
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_container_has_requests_and_limits(rendered, target):
    workloads = of_kind(rendered[target], *WORKLOAD_KINDS)
    assert workloads
    for w in workloads:
        for c in containers(w):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{target} {w['metadata']['name']}/{c['name']}: no {kind}.{r}"


@pytest.mark.parametrize("target", OVERLAYS)
def test_every_server_has_grpc_probes_on_the_health_port(rendered, target):
    servers = server_workloads(rendered[target])
    assert {component(w) for w in servers} == SERVICES
    for w in servers:
        for c in containers(w, init=False):
            health = int(flags(c)["health-port"])
            for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness"),
                                   ("startupProbe", "readiness")):
                p = c.get(probe)
                assert p and "grpc" in p, f"{target} {c['name']}: no gRPC {probe}"
                assert p["grpc"] == {"port": health, "service": service}, (target, c["name"], probe)
            startup = c["startupProbe"]
            budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
            assert budget >= 15 * 60, f"{target} {c['name']}: startup probe allows only {budget}s for model loading"


def effective_security(pod: dict, container: dict) -> dict:
    sc = dict(pod.get("securityContext", {}))
    sc.update(container.get("securityContext", {}))
    return sc


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_container_is_hardened(rendered, target):
    for w in of_kind(rendered[target], *WORKLOAD_KINDS):
        pod = pod_spec(w)
        where = f"{target} {w['kind']}/{w['metadata']['name']}"
        assert pod.get("automountServiceAccountToken") is False, where
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(forbidden), where
        for v in pod.get("volumes", []):
            kinds = set(v) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{where}: volume {v['name']} of type {kinds}"
        mounts_tmp = {}
        for c in containers(w):
            sc = effective_security(pod, c)
            assert sc.get("runAsNonRoot") is True, (where, c["name"])
            assert sc.get("runAsUser", 0) != 0, (where, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), (where, c["name"])
            assert not sc.get("capabilities", {}).get("add"), (where, c["name"])
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", (where, c["name"])
            assert not sc.get("privileged"), (where, c["name"])
            mounts_tmp[c["name"]] = any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", []))
        # A read-only root filesystem needs a writable /tmp.
        assert all(mounts_tmp.values()), f"{where}: containers without /tmp: {mounts_tmp}"


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_images_are_pinned(rendered, target):
    for w in of_kind(rendered[target], *WORKLOAD_KINDS):
        for c in containers(w):
            image = c["image"]
            if target == "overlays/dev-cpu":  # a local image loaded into kind/minikube
                assert image == "ice-cpu:dev", image
            else:  # what runs in a real cluster is named by digest, not by a tag that can move
                assert re.fullmatch(r"[^@:]+(:[^@]+)?@sha256:[0-9a-f]{64}", image), image
            assert not image.endswith(":latest"), image
            assert c.get("imagePullPolicy") == "IfNotPresent", (target, c["name"])


@pytest.mark.parametrize("target", GPU_OVERLAYS)
def test_one_gpu_image_serves_the_three_services(rendered, target):
    images = {c["image"] for w in server_workloads(rendered[target]) for c in containers(w)}
    assert len(images) == 1 and next(iter(images)).split("@")[0].endswith("/ice-gpu"), images


@pytest.mark.parametrize("target", OVERLAYS)
def test_grace_period_exceeds_the_servers_grace_seconds(rendered, target):
    for w in server_workloads(rendered[target]):
        grace = float(flags(main_container(w))["grace-seconds"])
        assert pod_spec(w)["terminationGracePeriodSeconds"] > grace, w["metadata"]["name"]


# ------------------------------------------------------------------------------------------------------------
# GPUs
# ------------------------------------------------------------------------------------------------------------
def tolerates_gpu(pod: dict) -> bool:
    return any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
        and (t.get("operator") == "Exists" or t.get("operator", "Equal") == "Equal")
        for t in pod.get("tolerations", [])
    )


@pytest.mark.parametrize("target", [*GPU_OVERLAYS, "examples/gke-with-servicemonitor"])
def test_gpu_pods_request_a_gpu_and_tolerate_the_taint(rendered, target):
    servers = server_workloads(rendered[target])
    assert {component(w) for w in servers} == SERVICES
    for w in of_kind(rendered[target], *WORKLOAD_KINDS):
        gpus = [c for c in containers(w) if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
        if w in servers:
            assert [c["name"] for c in gpus] == [component(w)], w["metadata"]["name"]
            assert gpus[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        if gpus:
            assert tolerates_gpu(pod_spec(w)), f"{target}: {w['metadata']['name']} requests a GPU without the toleration"
            assert pod_spec(w).get("nodeSelector"), f"{target}: {w['metadata']['name']} has no GPU node selector"


CLOUD_PLACEMENT = {
    "overlays/gke": ({"cloud.google.com/gke-accelerator"}, set()),
    "overlays/eks": ({"karpenter.sh/nodepool", "karpenter.k8s.aws/instance-gpu-manufacturer"}, set()),
    "overlays/aks": ({"kubernetes.azure.com/accelerator"}, {"sku"}),
}


@pytest.mark.parametrize("target", GPU_OVERLAYS)
def test_cloud_overlays_pick_their_gpu_node_pool(rendered, target):
    labels, taints = CLOUD_PLACEMENT[target]
    for w in server_workloads(rendered[target]):
        pod = pod_spec(w)
        assert labels <= set(pod["nodeSelector"]), (target, w["metadata"]["name"])
        assert taints <= {t["key"] for t in pod["tolerations"]}, (target, w["metadata"]["name"])


def test_dev_cpu_requests_no_gpu_and_runs_the_tiny_bundle_on_cpu(rendered):
    objs = rendered["overlays/dev-cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(objs)
    assert not of_kind(objs, "HorizontalPodAutoscaler")  # no prometheus-adapter on a laptop
    for w in server_workloads(objs):
        pod = pod_spec(w)
        assert not pod.get("tolerations") and not pod.get("nodeSelector")
        c = main_container(w)
        assert flags(c)["device"] == "cpu"
        assert c["image"] == "ice-cpu:dev"
        tiny, pin = pod["initContainers"]  # the bundle is made first, then checked like any other
        assert tiny["command"][:2] == ["ice-bundle", "tiny"] and pin["name"] == "bundle-pin"
        (bundle,) = [v for v in pod["volumes"] if v["name"] == "bundle"]
        assert set(bundle) == {"name", "emptyDir"}
        assert w["spec"]["replicas"] == 1
    (secret,) = of_kind(objs, "Secret")
    assert secret["metadata"]["name"].startswith("ice-auth")


@pytest.mark.parametrize("target", GPU_OVERLAYS)
def test_no_secret_is_committed_for_real_clusters(rendered, target):
    assert not of_kind(rendered[target], "Secret")


# ------------------------------------------------------------------------------------------------------------
# Services, ports, flags
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", OVERLAYS)
def test_services_are_headless_and_ports_agree_with_flags_and_probes(rendered, target):
    objs = rendered[target]
    services = of_kind(objs, "Service")
    assert services
    for svc in services:
        name = svc["metadata"]["name"]
        assert svc["spec"].get("clusterIP") == "None", f"{name} is not headless"
        backends = [w for w in server_workloads(objs) if selects({"matchLabels": svc["spec"]["selector"]},
                                                                 w["spec"]["template"]["metadata"]["labels"])]
        assert len(backends) == 1, f"{name} selects {len(backends)} workloads"
        c = main_container(backends[0])
        f = flags(c)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) == {"grpc", "metrics"}, name
        # Clients of a headless Service dial pod IPs at the Service port: it must be the container's port.
        for pname, flag in (("grpc", "port"), ("metrics", "metrics-port")):
            assert ports[pname]["port"] == port_number(c, ports[pname]["targetPort"]) == int(f[flag]), (name, pname)
        assert port_number(c, "health") == int(f["health-port"])
        assert len({int(f["port"]), int(f["health-port"]), int(f["metrics-port"])}) == 3
    # A StatefulSet's serviceName is its headless Service.
    for sts in of_kind(objs, "StatefulSet"):
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}


def _every_ice_variable_is_a_setting_of(service: str, data: dict[str, str]) -> None:
    """A misspelt ICE_* name would be ignored silently, and a bad value would stop the pod at start."""
    from services.common.settings import env_name, from_sources
    from tests.reliability.harness import SETTINGS

    known = {env_name(f.name) for f in fields(SETTINGS[service])}
    assert {k for k in data if k.startswith("ICE_")} <= known, sorted(set(data) - known)
    ice = {k: v for k, v in data.items() if k.startswith("ICE_")}
    from_sources(env=ice, cls=SETTINGS[service], bundle=Path("/models/x"))  # a value it cannot parse: SystemExit


@pytest.mark.parametrize("target", OVERLAYS)
def test_settings_and_token_come_from_the_configmap_and_the_secret(rendered, target):
    objs = rendered[target]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objs, "ConfigMap")}
    for w in server_workloads(objs):
        c = main_container(w)
        refs = [ref["configMapRef"]["name"] for ref in c["envFrom"]]
        assert all(r in configmaps for r in refs)
        assert sorted(r.rsplit("-", 1)[0] for r in refs) == ["ice-bundle", "ice-settings"]
        (bundle_cm,) = [r for r in refs if r.startswith("ice-bundle")]
        bundle_env = configmaps[bundle_cm]
        (settings_cm,) = [r for r in refs if r.startswith("ice-settings")]
        _every_ice_variable_is_a_setting_of(component(w), configmaps[settings_cm])
        token_file = flags(c)["auth-token-file"]
        (mount,) = [m for m in c["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")]
        (vol,) = [v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"]]
        assert vol["secret"]["secretName"].startswith("ice-auth")
        assert token_file.endswith("/" + vol["secret"]["items"][0]["path"])
        assert vol["secret"]["items"][0]["key"] == "token"
        # The bundle: a version folder on the read-only bundles/ mount, named (with its digest) in one ConfigMap.
        assert "bundle" not in flags(c)
        (bundle,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
        assert bundle.get("readOnly") is True
        assert bundle_env["ICE_BUNDLE"].startswith("/models/") and bundle_env["ICE_BUNDLE"].count("/") == 2
        digest = bundle_env["ICE_BUNDLE_DIGEST"]
        assert re.fullmatch(r"[0-9a-f]{64}", digest) if target != "overlays/dev-cpu" else digest == ""
        # The pin runs before the server, on the same bundle and ConfigMap.
        pin = next(i for i in pod_spec(w)["initContainers"] if i["name"] == "bundle-pin")
        assert [r["configMapRef"]["name"] for r in pin["envFrom"]] == [bundle_cm]
        assert [m for m in pin["volumeMounts"] if m["mountPath"] == "/models"] == [bundle]


@pytest.mark.parametrize("target", OVERLAYS)
def test_volumes_refer_to_claims_that_exist(rendered, target):
    objs = rendered[target]
    claims = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    for w in server_workloads(objs):
        for v in pod_spec(w)["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (target, v)
                if v["name"] == "bundle":
                    assert v["persistentVolumeClaim"]["readOnly"] is True
    # The learner's job store is a per-replica claim, mounted where --job-store points.
    (learner,) = [w for w in server_workloads(objs) if component(w) == "learner"]
    assert learner["kind"] == "StatefulSet"
    (template,) = learner["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in main_container(learner)["volumeMounts"] if m["name"] == template["metadata"]["name"]]
    assert flags(main_container(learner))["job-store"].startswith(mount["mountPath"] + "/")
    # One shared claim for everything the pods share (one file share, not one per use).
    assert {o["spec"]["accessModes"][0] for o in of_kind(objs, "PersistentVolumeClaim")} <= {
        "ReadWriteMany", "ReadWriteOnce"}
    assert claims == {"ice-data"}
    # The batch Jobs' claims are provided by the overlay they run beside.
    for job in of_kind(rendered["batch/extract"], "Job") + (
        of_kind(rendered["batch/assemble-bundle"], "Job") if target in GPU_OVERLAYS else []
    ):
        for v in pod_spec(job)["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (target, job["metadata"]["name"], v)


# ------------------------------------------------------------------------------------------------------------
# NetworkPolicy, PDB, HPA, ServiceMonitor
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_existing_ports(rendered, target):
    objs = rendered[target]
    servers = server_workloads(objs)
    policies = of_kind(objs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"].get("ingress") == [] and "Ingress" in p["spec"]["policyTypes"]]
    assert deny, "no default-deny ingress policy"
    for w in servers:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p["spec"]["podSelector"], labels) for p in deny), w["metadata"]["name"]
    opened = set()
    for p in policies:
        selected = [w for w in servers if selects(p["spec"]["podSelector"], w["spec"]["template"]["metadata"]["labels"])]
        assert selected, f"{p['metadata']['name']} selects no pod"
        for rule in p["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for w in selected:
                    port_number(main_container(w), port["port"])  # raises when the pod has no such port
                opened.add(port["port"])
    assert opened == {"grpc", "metrics"}  # never the health port: probes come from the kubelet
    # The batch Job's pods carry the client label that the gRPC policy admits.
    (grpc_policy,) = [p for p in policies if any(
        pt["port"] == "grpc" for r in p["spec"].get("ingress", []) for pt in r.get("ports", []))]
    (job,) = of_kind(rendered["batch/extract"], "Job")
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert any(selects(src["podSelector"], job_labels) for r in grpc_policy["spec"]["ingress"] for src in r["from"])


@pytest.mark.parametrize("target", OVERLAYS)
def test_each_server_has_a_pdb(rendered, target):
    objs = rendered[target]
    pdbs = of_kind(objs, "PodDisruptionBudget")
    for w in server_workloads(objs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        assert len(matching) == 1, w["metadata"]["name"]
        if target == "overlays/dev-cpu":  # one replica on a laptop: never block draining its node
            assert matching[0]["spec"] == {**matching[0]["spec"], "maxUnavailable": 1}
            assert "minAvailable" not in matching[0]["spec"]
        else:  # two replicas or more: a drain takes one at a time and always leaves one serving
            assert matching[0]["spec"]["minAvailable"] == 1 and "maxUnavailable" not in matching[0]["spec"]
    for p in pdbs:
        assert any(selects(p["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
                   for w in server_workloads(objs)), p["metadata"]["name"]


@pytest.mark.parametrize("target", GPU_OVERLAYS)
def test_hpa_scales_the_learner_on_the_jobs_it_holds(rendered, target):
    objs = rendered[target]
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    (learner,) = [w for w in server_workloads(objs) if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
    assert component(learner) == "learner"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # queued + running: a replica that is training with an empty queue is not idle (services/learner/jobs.py)
    assert metric["pods"]["metric"]["name"] == "ice_learner_active_jobs"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    from services.learner import jobs

    assert jobs.ACTIVE_JOBS._name == "ice_learner_active_jobs"


def test_servicemonitors_scrape_every_service_metrics_port(rendered):
    objs = rendered["examples/gke-with-servicemonitor"]
    monitors = of_kind(objs, "ServiceMonitor")
    for svc in of_kind(objs, "Service"):
        matching = [m for m in monitors if selects(m["spec"]["selector"], svc["metadata"]["labels"])]
        assert len(matching) == 1, svc["metadata"]["name"]
        assert [e["port"] for e in matching[0]["spec"]["endpoints"]] == ["metrics"]
        assert matching[0]["metadata"]["namespace"] == svc["metadata"]["namespace"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlays_put_everything_in_one_restricted_namespace(rendered, target):
    objs = rendered[target]
    (ns,) = of_kind(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objs:
        if o["kind"] in ("Namespace", "PriorityClass"):  # cluster-scoped
            assert "namespace" not in o["metadata"]
        else:
            assert o["metadata"]["namespace"] == ns["metadata"]["name"], (o["kind"], o["metadata"]["name"])
    for batch in BATCH:
        for o in rendered[batch]:
            assert o["metadata"]["namespace"] == ns["metadata"]["name"]


# ------------------------------------------------------------------------------------------------------------
# batch Jobs
# ------------------------------------------------------------------------------------------------------------
def manifest_items(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_extract_job(objs: list[dict]) -> int:
    (job,) = of_kind(objs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    for field in ("backoffLimitPerIndex", "maxFailedIndexes", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert isinstance(spec.get(field), int) and spec[field] > 0, field
    assert pod_spec(job)["restartPolicy"] == "Never"
    actions = {r["action"] for r in spec["podFailurePolicy"]["rules"]}
    assert {"FailIndex", "Ignore"} <= actions
    (c,) = containers(job)
    f = {k: expand(v, c) for k, v in flags(c).items()}
    completions = spec["completions"]
    assert f["shard-count"] == str(completions), "--shard-count must equal completions"
    assert f["shard-index"] == "$(JOB_COMPLETION_INDEX)"  # set by Kubernetes in each pod of an Indexed Job
    assert spec["parallelism"] >= 1
    # The manifest the Job mounts, sharded as the pods will: every image exactly once.
    (cm,) = of_kind(objs, "ConfigMap")
    manifest_path = c["args"][1]
    (mount,) = [m for m in c["volumeMounts"] if manifest_path.startswith(m["mountPath"] + "/")]
    (vol,) = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    items = manifest_items(cm["data"][manifest_path.rsplit("/", 1)[1]])
    assert len(items) > completions
    taken = Counter(item for i in range(completions) for item in shard(items, i, int(f["shard-count"])))
    assert taken == Counter(items) and set(taken.values()) == {1}
    return completions


def test_batch_job_is_indexed_and_its_shards_cover_the_manifest(rendered):
    check_extract_job(rendered["batch/extract"])


@needs_kubectl
def test_shard_count_follows_completions(tmp_path):
    copy = tmp_path / "extract"
    shutil.copytree(K8S / "batch" / "extract", copy)
    job = copy / "job.yaml"
    text, n = re.subn(r"(?m)^(  completions:) \d+", r"\1 3", job.read_text())
    assert n == 1
    job.write_text(text)
    assert check_extract_job(render_dir(copy)) == 3


def test_batch_job_reaches_the_services_by_their_headless_names_and_ports(rendered):
    (job,) = of_kind(rendered["batch/extract"], "Job")
    (c,) = containers(job)
    assert c["command"] == ["python", "-m", "client"] and c["args"][0] == "batch"
    f = flags(c)
    services = {s["metadata"]["name"]: s for s in of_kind(rendered["overlays/gke"], "Service")}
    for svc in SERVICES:
        # no cluster domain: the pod's DNS search path completes the name in any cluster
        m = re.fullmatch(r"dns:///([a-z-]+)\.\$\(POD_NAMESPACE\)\.svc:(\d+)", f[svc])
        assert m, f[svc]
        grpc = [p["port"] for p in services[m.group(1)]["spec"]["ports"] if p["name"] == "grpc"]
        assert m.group(1) == f"ice-{svc}" and grpc == [int(m.group(2))]
    assert f["out"].startswith("/outputs/")
    (out,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/outputs"]
    (vol,) = [v for v in pod_spec(job)["volumes"] if v["name"] == out["name"]]
    assert vol["persistentVolumeClaim"]["claimName"] == "ice-data" and out["subPath"] == "outputs"
    assert "$(" not in expand(f["out"], c)  # a fixed run directory: re-running resumes it


def test_assemble_job_reads_weights_and_writes_then_verifies_the_bundle(rendered):
    (job,) = of_kind(rendered["batch/assemble-bundle"], "Job")
    pod = pod_spec(job)
    (assemble,) = pod["initContainers"]
    (verify,) = pod["containers"]
    # a shell guard that skips a version already assembled, then exactly `ice-bundle assemble ...`
    assert assemble["command"][:2] == ["/bin/sh", "-c"] and assemble["args"][:2] == ["ice-bundle", "assemble"]
    assert verify["command"] == ["ice-bundle"] and verify["args"][:1] == ["verify"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"data": {"claimName": "ice-data"}}
    mounts = {m["mountPath"]: m for m in assemble["volumeMounts"]}
    assert mounts["/weights"]["subPath"] == "weights" and mounts["/weights"]["readOnly"] is True
    assert mounts["/models"]["subPath"] == "bundles" and not mounts["/models"].get("readOnly")
    f = flags(assemble)
    # a version folder inside the bundles/ mount, never the mount point; the services load the same folder
    assert f["out"] == "/models/$(BUNDLE_VERSION)" == verify["args"][1]
    version = env_value(assemble, "BUNDLE_VERSION")
    assert version == env_value(verify, "BUNDLE_VERSION") and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", version)
    (bundle_cm,) = [o for o in of_kind(rendered["overlays/gke"], "ConfigMap")
                    if o["metadata"]["name"].startswith("ice-bundle")]
    assert bundle_cm["data"]["ICE_BUNDLE"] == f"/models/{version}"
    for flag in ("diffusion", "open-clip-config", "open-clip-weights", "dino", "vocab"):
        assert f[flag].startswith("/weights/"), flag
    assert "copy" in f  # /weights and /models are two mounts: no hard links across them
    assert "force" not in f  # a bundle under running pods is never overwritten
    spec = job["spec"]
    for field in ("activeDeadlineSeconds", "ttlSecondsAfterFinished", "podFailurePolicy"):
        assert field in spec
    assert pod["restartPolicy"] == "Never"


def test_bucket_job_reads_and_writes_object_storage_with_its_own_identity(rendered):
    from client.cli import build_parser

    (job,) = of_kind(rendered["batch/extract-bucket"], "Job")
    (c,) = containers(job)
    env = {"JOB_COMPLETION_INDEX": "0", "POD_NAMESPACE": "ice"}
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1)) or env_value(c, m.group(1)) or m.group(0), a)
            for a in c["args"]]
    a = build_parser().parse_args(args)
    assert a.source.startswith("s3://") and a.out.startswith("s3://") and "$(" not in a.out
    assert not of_kind(rendered["batch/extract-bucket"], "ConfigMap")  # the manifest lives in the bucket
    assert not [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    (sa,) = of_kind(rendered["batch/extract-bucket"], "ServiceAccount")
    assert pod_spec(job)["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert sa["automountServiceAccountToken"] is False
    assert "extract" in job["spec"]["template"]["spec"]["containers"][0]["name"]


def test_batch_job_args_are_what_the_ice_cli_accepts(rendered, tmp_path):
    """The Job's command line, as Kubernetes expands it in pod 0, parsed by the real `ice` parser; its manifest
    read by the real batch reader: the images are the absolute /inputs paths, sharded as the test above."""
    from client.batch import list_items
    from client.cli import build_parser

    objs = rendered["batch/extract"]
    (job,) = of_kind(objs, "Job")
    (c,) = containers(job)
    env = {"JOB_COMPLETION_INDEX": "0", "POD_NAMESPACE": "ice"}
    args = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: env.get(m.group(1)) or env_value(c, m.group(1)) or m.group(0), a)
            for a in c["args"]]
    assert not any("$(" in a for a in args), args
    a = build_parser().parse_args(args)
    assert a.shard_count == job["spec"]["completions"] and a.shard_index == 0
    assert str(a.token_file) == "/var/run/secrets/ice/token"
    assert a.localizer == "dns:///ice-localizer.ice.svc:50051"
    assert a.concurrency * job["spec"]["parallelism"] <= 18  # the learners' capacity (k8s/policy.py batch-load)
    (cm,) = of_kind(objs, "ConfigMap")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(cm["data"]["manifest.txt"])
    items = list_items(manifest)
    (inputs,) = [m for m in c["volumeMounts"] if m.get("subPath") == "inputs"]
    assert inputs["readOnly"] is True
    assert items and all(str(i.image).startswith(inputs["mountPath"] + "/") for i in items)
    ids = Counter(i.id for k in range(a.shard_count) for i in shard(items, k, a.shard_count))
    assert ids == Counter(i.id for i in items) and set(ids.values()) == {1}


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_each_learner_replica_advertises_its_stable_address(rendered, target):
    """A job lives on the replica that took it; clients follow `replica_address` there. It must be the pod's
    StatefulSet DNS name under the governing headless Service, on the gRPC port the container serves."""
    (learner,) = [o for o in of_kind(rendered[target], "StatefulSet") if component(o) == "learner"]
    container = main_container(learner)
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container.get("env", [])}
    assert env.get("POD_NAME") == "metadata.name" and env.get("POD_NAMESPACE") == "metadata.namespace"
    service = learner["spec"]["serviceName"]
    (svc,) = [s for s in of_kind(rendered[target], "Service") if s["metadata"]["name"] == service]
    assert svc["spec"].get("clusterIP") == "None"
    advertised = flags(container)["advertise-address"]
    assert advertised == f"$(POD_NAME).{service}.$(POD_NAMESPACE).svc:{flags(container)['port']}"


# ------------------------------------------------------------------------------------------------------------
# k8s/policy.py: each rule fails on the fault it exists for (the manifests as they were before it)
# ------------------------------------------------------------------------------------------------------------
def _policy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_policy", K8S / "policy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nodes() -> dict:
    return yaml.safe_load((K8S / "nodes.yaml").read_text())


def _by(objs, kind, name_prefix):
    (o,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)]
    return o


def test_policy_holds_for_every_render(rendered):
    policy = _policy()
    assert policy.run(rendered, _nodes()) == []


def _break_assemble_out(r):  # item 1: --out at the root of the mounted volume
    job = _by(r["batch/assemble-bundle"], "Job", "ice-assemble-bundle")
    init = pod_spec(job)["initContainers"][0]
    init["args"] = [a if not a.startswith("--out=") else "--out=/models" for a in init["args"]]


def _break_tiny_out(r):  # item 1: the dev-cpu init container onto its emptyDir's mount point
    for w in server_workloads(r["overlays/dev-cpu"]):
        tiny = pod_spec(w)["initContainers"][0]
        tiny["command"] = ["ice-bundle", "tiny", "--out", "/models", "--force"]


def _break_assemble_force(r):  # item 5: a bundle overwritten under running pods
    pod_spec(_by(r["batch/assemble-bundle"], "Job", "ice-assemble-bundle"))["initContainers"][0]["args"].append(
        "--force")


def _break_learner_cpu(r):  # item 2: the learner's 4 CPUs on the 4-vCPU machine documented before
    r["__nodes__"]["aks"] = {"machine": "Standard_NC4as_T4_v3", "daemonsets": {"cpu": "500m", "memory": "1Gi"},
                             "allocatable": {"cpu": "3860m", "memory": "24Gi", "nvidia.com/gpu": 1}}
    learner = _by(r["overlays/aks"], "StatefulSet", "ice-learner")
    main_container(learner)["resources"]["requests"].update(cpu="4", memory="12Gi")
    main_container(learner)["resources"]["limits"].update(memory="16Gi")


def _break_hpa_metric(r):  # item 6: queued jobs only
    hpa = _by(r["overlays/gke"], "HorizontalPodAutoscaler", "ice-learner")
    hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] = "ice_learner_queue_depth"


def _break_learner_replicas(r):  # item 6: a count that every apply would restore, scaling the learners in
    _by(r["overlays/gke"], "StatefulSet", "ice-learner")["spec"]["replicas"] = 2


def _break_learner_drain(r):  # item 6 and 9: no drain before the learner stops
    del main_container(_by(r["overlays/eks"], "StatefulSet", "ice-learner"))["lifecycle"]


def _break_batch_load(r):  # item 7: 8 shards x concurrency 2 on the learners' capacity
    pod_spec(_by(r["overlays/gke"], "StatefulSet", "ice-learner"))  # (unchanged)
    _by(r["batch/extract"], "Job", "ice-batch-extract")["spec"]["parallelism"] = 8
    _by(r["overlays/gke"], "HorizontalPodAutoscaler", "ice-learner")["spec"]["minReplicas"] = 1


def _break_batch_grace(r):  # item 7: no time to write the summary on SIGTERM
    pod_spec(_by(r["batch/extract"], "Job", "ice-batch-extract"))["terminationGracePeriodSeconds"] = 10


def _break_replicas(r):  # item 9: one replica
    _by(r["overlays/gke"], "Deployment", "ice-localizer")["spec"]["replicas"] = 1


def _break_pdb(r):  # item 9: a budget that protects nothing
    pdb = _by(r["overlays/aks"], "PodDisruptionBudget", "ice-evaluator")
    del pdb["spec"]["minAvailable"]
    pdb["spec"]["maxUnavailable"] = 1


def _break_deadline(r):  # item 9: the default 600 s roll-out deadline
    del _by(r["overlays/eks"], "Deployment", "ice-evaluator")["spec"]["progressDeadlineSeconds"]


def _break_spread(r):  # item 9: nothing spreads replicas over zones
    del pod_spec(_by(r["overlays/gke"], "Deployment", "ice-evaluator"))["topologySpreadConstraints"]


def _break_priority(r):  # item 9
    del pod_spec(_by(r["overlays/gke"], "StatefulSet", "ice-learner"))["priorityClassName"]


def _break_shutdown_budget(r):  # item 9: preStop + grace not inside the grace period
    pod_spec(_by(r["overlays/aks"], "StatefulSet", "ice-learner"))["terminationGracePeriodSeconds"] = 90


def _break_network_policy(r):  # item 10: any namespace
    policy = _by(r["overlays/gke"], "NetworkPolicy", "ice-allow-grpc-from-clients")
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"ice/client": "true"}}}]


def _break_service_account(r):  # item 10: the namespace's default account
    del pod_spec(_by(r["overlays/eks"], "Deployment", "ice-localizer"))["serviceAccountName"]


def _break_cluster_domain(r):  # item 10
    learner = main_container(_by(r["overlays/gke"], "StatefulSet", "ice-learner"))
    learner["args"] = [a.replace(".svc:", ".svc.cluster.local:") for a in learner["args"]]


@pytest.mark.parametrize(("fault", "rule", "words"), [
    (_break_assemble_out, "bundle-writes", "is a mount point"),
    (_break_tiny_out, "bundle-writes", "is a mount point"),
    (_break_assemble_force, "bundle-writes", "--force"),
    (_break_learner_cpu, "node-fit", "requests cpu 4"),
    (_break_hpa_metric, "learner-scaling", "ice_learner_queue_depth"),
    (_break_learner_drain, "learner-scaling", "no preStop drain"),
    (_break_learner_replicas, "learner-scaling", "owns the count"),
    (_break_batch_load, "batch-load", "16 learning jobs in flight"),
    (_break_batch_grace, "batch-load", "terminationGracePeriodSeconds 10"),
    (_break_replicas, "availability", "1 replica(s)"),
    (_break_pdb, "availability", "no minAvailable"),
    (_break_deadline, "availability", "progressDeadlineSeconds 600"),
    (_break_spread, "availability", "topology.kubernetes.io/zone"),
    (_break_priority, "availability", "priorityClassName None"),
    (_break_shutdown_budget, "availability", "not strictly inside"),
    (_break_network_policy, "security", "admits every namespace"),
    (_break_service_account, "security", "default ServiceAccount"),
    (_break_cluster_domain, "security", "cluster.local"),
], ids=lambda v: v.__name__.removeprefix("_break_") if callable(v) else None)
def test_policy_fails_on_the_fault_it_exists_for(rendered, fault, rule, words):
    import copy

    policy = _policy()
    broken = copy.deepcopy(rendered)
    broken["__nodes__"] = _nodes()
    fault(broken)
    nodes = broken.pop("__nodes__")
    failures = policy.run(broken, nodes)
    assert failures, f"{fault.__name__}: no rule failed"
    assert any(f" {rule} " in line and words in line for line in failures), failures


def test_documented_machines_are_the_ones_the_checks_use():
    """docs/deployment.md lists, per cloud, the machine the overlay is sized for: the one k8s/nodes.yaml names."""
    doc = (ROOT / "docs/deployment.md").read_text()
    for cloud, node in _nodes().items():
        assert node["machine"] in doc, (cloud, node["machine"])
        assert re.fullmatch(r"\d+", str(node["driver"])) and f"{node['driver']}" in doc
        overlay = (K8S / "overlays" / cloud / "kustomization.yaml").read_text()
        assert node["machine"] in overlay, (cloud, "the overlay names its machine")


def test_bundle_image_volume_replaces_the_share_for_the_bundle_only(rendered):
    """The optional component: the bundle from a node-cached OCI image (by digest), mounted whole at /models where
    ICE_BUNDLE and the pin look; everything else as in the overlay it is added to."""
    objs, base = rendered["examples/gke-with-bundle-image"], rendered["overlays/gke"]
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objs, "ConfigMap")}
    for w in server_workloads(objs):
        pod = pod_spec(w)
        (volume,) = [v for v in pod["volumes"] if v["name"] == "bundle"]
        assert set(volume) == {"name", "image"}
        assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", volume["image"]["reference"])
        for c in [*pod["initContainers"], main_container(w)]:
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "bundle"]
            assert mount == {"name": "bundle", "mountPath": "/models", "readOnly": True}
        bundle = next(configmaps[r["configMapRef"]["name"]] for r in main_container(w)["envFrom"]
                      if r["configMapRef"]["name"].startswith("ice-bundle"))["ICE_BUNDLE"]
        assert bundle.startswith("/models/")
        (twin,) = [b for b in server_workloads(base) if b["metadata"]["name"] == w["metadata"]["name"]]
        assert [v for v in pod["volumes"] if v["name"] != "bundle"] == [
            v for v in pod_spec(twin)["volumes"] if v["name"] != "bundle"]
