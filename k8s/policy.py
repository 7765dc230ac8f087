#!/usr/bin/env python3
"""Deployment policy over the rendered manifests: what schemas cannot see, and what a platform review found
broken while every object was valid. `k8s/validate.sh` (and so `make k8s-validate` and `make test`) runs it on
every rendered entry point:

    python k8s/policy.py --nodes k8s/nodes.yaml overlays/gke=gke.yaml ... batch/extract=extract.yaml

Each check names the rule it enforces:
  bundle-writes   `ice-bundle tiny|assemble --out` is a folder inside a writable volume, never a mount point
                  (staging beside it and renaming it only work inside the volume); `assemble` never --force
                  (bundles are immutable); the services load what the writers write.
  node-fit        each GPU pod's requests fit one node of the machine its overlay documents (k8s/nodes.yaml).
  learner-scaling the learner scales on jobs it holds (queued + running), and drains before it stops.
  batch-load      a batch Job's learning jobs in flight fit the learners' capacity; SIGTERM is not a failure.
  availability    two or more replicas, a PodDisruptionBudget that keeps one, zone spreading, a PriorityClass,
                  a roll-out deadline above image pull + start-up, a shutdown budget inside the grace period.
  security        a ServiceAccount per workload, NetworkPolicies that name namespaces, no hard-coded cluster
                  domain.
Exit status 0 when every rule holds; each violation is one line `FAIL  policy <rule> <target>: <what>`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

SERVER_KINDS = ("Deployment", "StatefulSet")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
# Pulling the ~10 GB GPU image onto a cold node: what a roll-out deadline must allow on top of the start-up probe.
IMAGE_PULL_SECONDS = 600
# `ice batch` on SIGTERM: stops, writes its summary and exits within this (client/batch.py STOP_SECONDS).
BATCH_STOP_SECONDS = 20
# Defaults of the flags when a manifest does not set them (client/cli.py, services/common/settings.py).
DEFAULT_CONCURRENCY = 2
DEFAULT_QUEUE_SIZE = 8
ACTIVE_JOBS_METRIC = "ice_learner_active_jobs"
EXIT_SIGTERM = 143


# ----------------------------------------------------------------------------------------------------------------
# quantities and small helpers
# ----------------------------------------------------------------------------------------------------------------
_SUFFIX = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ("7910m", "28Gi", 2) as a number (cores, bytes, count)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def of_kind(objs, *kinds) -> list[dict]:
    return [o for o in objs if o.get("kind") in kinds]


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag(args: list[str], flag_name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list, else None."""
    for i, a in enumerate(args):
        if a == f"--{flag_name}" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(f"--{flag_name}="):
            return a.split("=", 1)[1]
    return None


def has_flag(args: list[str], flag_name: str) -> bool:
    return any(a == f"--{flag_name}" or a.startswith(f"--{flag_name}=") for a in args)


def env_literals(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """The container's environment as far as the manifests fix it: ConfigMaps it imports, then literal values."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        cm = ref.get("configMapRef", {}).get("name")
        env.update(configmaps.get(cm, {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def template_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def inside(path: str, folder: str) -> bool:
    return path.rstrip("/").startswith(folder.rstrip("/") + "/")


def flags_of(container: dict) -> dict[str, str]:
    out = {}
    for a in container.get("args", []):
        m = re.fullmatch(r"--([a-z0-9-]+)=(.*)", a)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def main_container(obj: dict) -> dict:
    component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    containers = pod(obj)["containers"]
    return next((c for c in containers if c["name"] == component), containers[0])


def configmap_data(objs) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objs, "ConfigMap")}


# ----------------------------------------------------------------------------------------------------------------
# bundle-writes (issue: a bundle written onto a mount point can neither be staged nor renamed into place)
# ----------------------------------------------------------------------------------------------------------------
def bundle_writers(objs) -> list[tuple[dict, dict, str, list[str], dict]]:
    """(workload, container, subcommand, argv, env) of every `ice-bundle tiny|assemble`."""
    configmaps = configmap_data(objs)
    out = []
    for w in of_kind(objs, *WORKLOAD_KINDS):
        for c in [*pod(w).get("initContainers", []), *pod(w)["containers"]]:
            args = argv(c)
            for i, a in enumerate(args):
                if Path(a).name == "ice-bundle" and i + 1 < len(args) and args[i + 1] in ("tiny", "assemble"):
                    out.append((w, c, args[i + 1], args[i:], env_literals(c, configmaps)))
                    break
    return out


def mount_for(container: dict, path: str) -> dict | None:
    """The volumeMount whose folder holds `path` (deepest first), or None."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    return next((m for m in mounts if path == m["mountPath"] or inside(path, m["mountPath"])), None)


def check_bundle_writes(objs) -> list[str]:
    failures = []
    for w, c, sub, args, env in bundle_writers(objs):
        where = f"{name(w)} container {c['name']}"
        out = flag(args, "out")
        if out is None:
            failures.append(f"{where}: ice-bundle {sub} without --out")
            continue
        out = expand(out, env).rstrip("/")
        mounts = {m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])}
        if out in mounts:
            failures.append(f"{where}: ice-bundle {sub} --out {out} is a mount point: the bundle is staged beside "
                            f"it and renamed into place, which only works in a folder inside the volume")
            continue
        mount = mount_for(c, out)
        if mount is None:
            failures.append(f"{where}: ice-bundle {sub} --out {out} is on the container's (read-only) root "
                            f"filesystem, not in a volume")
        elif mount.get("readOnly"):
            failures.append(f"{where}: ice-bundle {sub} --out {out} is in a read-only mount")
        if sub == "assemble" and has_flag(args, "force"):
            failures.append(f"{where}: ice-bundle assemble --force would overwrite a bundle under running pods: "
                            f"bundles are immutable, assemble a new version instead")
    # The services load the bundle the writers write (dev-cpu: the tiny bundle its init container makes).
    configmaps = configmap_data(objs)
    writers = {(id(w), expand(flag(args, "out") or "", env).rstrip("/"))
               for w, _c, _s, args, env in bundle_writers(objs)}
    for w in of_kind(objs, *SERVER_KINDS):
        c = main_container(w)
        env = env_literals(c, configmaps)
        bundle = expand(flags_of(c).get("bundle") or env.get("ICE_BUNDLE", ""), env).rstrip("/")
        if not bundle:
            failures.append(f"{name(w)}: no bundle (--bundle or ICE_BUNDLE)")
            continue
        if bundle in {m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])}:
            failures.append(f"{name(w)}: loads the bundle from the mount point {bundle}: bundles are versioned "
                            f"folders inside the volume")
        own = {out for wid, out in writers if wid == id(w)}
        if own and bundle not in own:
            failures.append(f"{name(w)}: loads {bundle}, but its init container writes {sorted(own)}")
    return failures


def bundle_location(container: dict, path: str, pod_spec: dict) -> tuple[str, str] | None:
    """(claim, path within the claim) of a path in a container, when it lies on a PersistentVolumeClaim."""
    mount = mount_for(container, path)
    if mount is None:
        return None
    volume = next((v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"]), {})
    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
    if claim is None:
        return None
    rest = path[len(mount["mountPath"].rstrip("/")):].strip("/")
    return claim, "/".join(p for p in (mount.get("subPath", ""), rest) if p)


def check_bundle_versions(overlay_objs, assemble_objs) -> list[str]:
    """The version the assemble Job writes is the one the overlay's services load (same claim, same folder)."""
    written = set()
    for w, c, _sub, args, env in bundle_writers(assemble_objs):
        out = expand(flag(args, "out") or "", env)
        loc = bundle_location(c, out, pod(w))
        if loc:
            written.add(loc)
    failures = []
    configmaps = configmap_data(overlay_objs)
    for w in of_kind(overlay_objs, *SERVER_KINDS):
        c = main_container(w)
        env = env_literals(c, configmaps)
        loc = bundle_location(c, env.get("ICE_BUNDLE", ""), pod(w))
        if loc is not None and written and loc not in written:
            failures.append(f"{name(w)} loads {loc[1]} on claim {loc[0]}, the assemble Job writes "
                            f"{sorted(f'{p} on claim {cl}' for cl, p in written)}")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# node-fit (issue: the learner requested more CPU than the documented GPU machines offer)
# ----------------------------------------------------------------------------------------------------------------
RESOURCES = ("cpu", "memory", "nvidia.com/gpu")


def pod_requests(spec: dict) -> dict[str, float]:
    """What the scheduler reserves for a pod: per resource, the larger of the largest init container and the sum
    of the containers (a GPU counts from its limit, as extended resources are requested by their limit)."""
    def request(c, r):
        res = c.get("resources", {})
        value = res.get("requests", {}).get(r, res.get("limits", {}).get(r) if r == "nvidia.com/gpu" else None)
        return quantity(value) if value is not None else 0.0

    out = {}
    for r in RESOURCES:
        init = max((request(c, r) for c in spec.get("initContainers", [])), default=0.0)
        out[r] = max(init, sum(request(c, r) for c in spec["containers"]))
    return out


def show(resource: str, value: float) -> str:
    return f"{value / 2**30:.2f}Gi" if resource == "memory" else f"{value:g}"


def check_node_fit(objs, node: dict, cloud: str) -> list[str]:
    failures = []
    allocatable = {r: quantity(v) for r, v in node["allocatable"].items()}
    reserved = {r: quantity(v) for r, v in node.get("daemonsets", {}).items()}
    for w in of_kind(objs, *SERVER_KINDS):
        need = pod_requests(pod(w))
        if not need.get("nvidia.com/gpu"):
            continue
        for r in RESOURCES:
            room = allocatable.get(r, 0.0) - reserved.get(r, 0.0)
            if need[r] > room:
                failures.append(f"{name(w)} requests {r} {show(r, need[r])}, but a {node['machine']} node ({cloud}) "
                                f"offers {show(r, room)} to it (allocatable {show(r, allocatable.get(r, 0.0))} less "
                                f"{show(r, reserved.get(r, 0.0))} for the cloud's own pods): it would never be "
                                f"scheduled")
        for c in pod(w)["containers"]:
            limit = c.get("resources", {}).get("limits", {}).get("memory")
            if limit is not None and quantity(limit) > allocatable["memory"]:
                failures.append(f"{name(w)} container {c['name']}: memory limit {limit} exceeds a {node['machine']} "
                                f"node's allocatable memory: the node, not the limit, would stop it")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# learner-scaling (issue: the HPA counted queued jobs only, and scale-in could cut a running job)
# ----------------------------------------------------------------------------------------------------------------
def learner(objs) -> dict | None:
    return next((w for w in of_kind(objs, *SERVER_KINDS)
                 if w["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "learner"), None)


def hpa_for(objs, workload: dict) -> dict | None:
    return next((h for h in of_kind(objs, "HorizontalPodAutoscaler")
                 if h["spec"]["scaleTargetRef"]["kind"] == workload["kind"]
                 and h["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]), None)


def prestop_seconds(container: dict) -> float | None:
    """How long the preStop hook may take: a sleep action's seconds, or an exec drain's timeout (its last
    argument); None without a hook."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return None
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if command and command[0] == "sleep":
        return float(command[1])
    if command and re.fullmatch(r"[0-9.]+", command[-1]):
        return float(command[-1])
    return float("inf")  # an unbounded hook: only the grace period ends it


def check_learner_scaling(objs) -> list[str]:
    w = learner(objs)
    if w is None:
        return ["no learner workload"]
    failures = []
    hpa = hpa_for(objs, w)
    if hpa is not None:
        names = [m.get("pods", {}).get("metric", {}).get("name") for m in hpa["spec"].get("metrics", [])]
        if ACTIVE_JOBS_METRIC not in names:
            failures.append(f"{name(hpa)} scales on {names}: a replica training with an empty queue reports 0 "
                            f"and scale-in removes it mid-job; scale on {ACTIVE_JOBS_METRIC} (queued + running)")
        if "replicas" in w["spec"]:
            failures.append(f"{name(w)} sets replicas ({w['spec']['replicas']}) while {name(hpa)} owns the count: "
                            f"every apply would scale the learners in, cutting or draining their jobs")
    c = main_container(w)
    hook = c.get("lifecycle", {}).get("preStop", {})
    command = hook.get("exec", {}).get("command", [])
    if not command or ACTIVE_JOBS_METRIC not in " ".join(command):
        failures.append(f"{name(w)}: no preStop drain that waits until the replica holds no job "
                        f"({ACTIVE_JOBS_METRIC} on its /metrics): scale-in and drains would cut running jobs")
    else:
        port = flags_of(c).get("metrics-port")
        if port is None or port not in command[3:]:
            failures.append(f"{name(w)}: the preStop drain does not read the metrics port {port}")
    annotations = w["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
        failures.append(f"{name(w)}: the cluster autoscaler may evict a replica holding a job to consolidate "
                        f"nodes (annotation cluster-autoscaler.kubernetes.io/safe-to-evict: \"false\")")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# batch-load (issue: 8 shards x concurrency 2 overflowed the learners' queue; SIGTERM was not handled)
# ----------------------------------------------------------------------------------------------------------------
def learner_capacity(objs) -> tuple[int, str]:
    w = learner(objs)
    hpa = hpa_for(objs, w)
    replicas = hpa["spec"].get("minReplicas", 1) if hpa else w["spec"].get("replicas", 1)
    queue = int(flags_of(main_container(w)).get("queue-size", DEFAULT_QUEUE_SIZE))
    return replicas * (queue + 1), f"{replicas} learner replica(s) x (queue {queue} + 1 running)"


def check_batch_load(batch_objs, overlay_objs, target: str) -> list[str]:
    failures = []
    capacity, how = learner_capacity(overlay_objs)
    for job in of_kind(batch_objs, "Job"):
        for c in pod(job)["containers"]:
            args = argv(c)
            if "batch" not in args:
                continue
            concurrency = int(flag(args, "concurrency") or DEFAULT_CONCURRENCY)
            parallelism = job["spec"].get("parallelism", 1)
            if parallelism * concurrency > capacity:
                failures.append(f"{name(job)}: parallelism {parallelism} x --concurrency {concurrency} = "
                                f"{parallelism * concurrency} learning jobs in flight, but {target} takes {capacity} "
                                f"({how}): the rest would be refused with RESOURCE_EXHAUSTED")
            grace = pod(job).get("terminationGracePeriodSeconds", 30)
            if grace <= BATCH_STOP_SECONDS:
                failures.append(f"{name(job)}: terminationGracePeriodSeconds {grace} leaves `ice batch` no time to "
                                f"stop and write its summary on SIGTERM ({BATCH_STOP_SECONDS} s)")
            for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
                codes = rule.get("onExitCodes", {})
                if rule["action"] in ("FailIndex", "FailJob") and codes.get("operator") == "In" \
                        and EXIT_SIGTERM in codes.get("values", []):
                    failures.append(f"{name(job)}: exit {EXIT_SIGTERM} (stopped by SIGTERM) must not fail the index")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# availability (issue: one replica, a budget protecting nothing, no spreading, a default roll-out deadline)
# ----------------------------------------------------------------------------------------------------------------
def startup_seconds(container: dict) -> float:
    p = container.get("startupProbe", {})
    return p.get("initialDelaySeconds", 0) + p.get("periodSeconds", 10) * p.get("failureThreshold", 3)


def check_availability(objs) -> list[str]:
    failures = []
    pdbs = of_kind(objs, "PodDisruptionBudget")
    priorities = {o["metadata"]["name"]: o for o in of_kind(objs, "PriorityClass")}
    for w in of_kind(objs, *SERVER_KINDS):
        labels = template_labels(w)
        spec = pod(w)
        hpa = hpa_for(objs, w)
        replicas = hpa["spec"].get("minReplicas", 1) if hpa else w["spec"].get("replicas", 1)
        if replicas < 2:
            failures.append(f"{name(w)}: {replicas} replica(s): a node drain or a zone outage takes the service down")
        mine = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        if len(mine) != 1:
            failures.append(f"{name(w)}: {len(mine)} PodDisruptionBudgets select it (want 1)")
        else:
            keep = mine[0]["spec"].get("minAvailable")
            if not isinstance(keep, int) or keep < 1:
                failures.append(f"{name(mine[0])}: no minAvailable >= 1: the budget does not keep a replica serving")
            elif keep >= replicas:
                failures.append(f"{name(mine[0])}: minAvailable {keep} with {replicas} replica(s) forbids every drain")
        zones = [t for t in spec.get("topologySpreadConstraints", [])
                 if t.get("topologyKey") == "topology.kubernetes.io/zone" and selects(t.get("labelSelector"), labels)]
        if not zones:
            failures.append(f"{name(w)}: no topologySpreadConstraint over topology.kubernetes.io/zone")
        pc = spec.get("priorityClassName")
        if not pc or pc not in priorities or priorities[pc].get("value", 0) <= 0:
            failures.append(f"{name(w)}: priorityClassName {pc!r} is not a rendered PriorityClass above the default")
        c = main_container(w)
        if w["kind"] == "Deployment":
            deadline = w["spec"].get("progressDeadlineSeconds", 600)
            need = startup_seconds(c) + IMAGE_PULL_SECONDS
            if deadline < need:
                failures.append(f"{name(w)}: progressDeadlineSeconds {deadline} < start-up allowance "
                                f"{startup_seconds(c):g} + image pull {IMAGE_PULL_SECONDS}: healthy roll-outs "
                                f"would be reported failed")
        stop = prestop_seconds(c)
        grace = float(flags_of(c).get("grace-seconds", 30))
        period = spec.get("terminationGracePeriodSeconds", 30)
        if stop is None:
            failures.append(f"{name(w)}: no preStop hook: the pod stops before clients see it leave the Service")
        elif not stop + grace < period:
            failures.append(f"{name(w)}: preStop {stop:g} s + --grace-seconds {grace:g} is not strictly inside "
                            f"terminationGracePeriodSeconds {period}: the kubelet kills it mid-shutdown")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# security
# ----------------------------------------------------------------------------------------------------------------
def check_security(objs) -> list[str]:
    failures = []
    accounts = {o["metadata"]["name"]: o for o in of_kind(objs, "ServiceAccount")}
    used: dict[str, str] = {}
    for w in of_kind(objs, *SERVER_KINDS):
        sa = pod(w).get("serviceAccountName")
        if not sa or sa == "default":
            failures.append(f"{name(w)}: runs as the namespace's default ServiceAccount")
            continue
        if sa in used:
            failures.append(f"{name(w)}: shares ServiceAccount {sa} with {used[sa]}")
        used[sa] = name(w)
        if sa not in accounts:
            failures.append(f"{name(w)}: ServiceAccount {sa} is not rendered")
        elif accounts[sa].get("automountServiceAccountToken") is not False:
            failures.append(f"ServiceAccount/{sa}: mounts an API token by default")
    for p in of_kind(objs, "NetworkPolicy"):
        for rule in p["spec"].get("ingress", []):
            for src in rule.get("from", []):
                if "namespaceSelector" in src and not src["namespaceSelector"]:
                    failures.append(f"{name(p)}: admits every namespace (namespaceSelector: {{}}); a pod label "
                                    f"alone is no boundary")
    for w in of_kind(objs, *WORKLOAD_KINDS):
        if "cluster.local" in yaml.safe_dump(w):
            failures.append(f"{name(w)}: hard-codes the cluster domain cluster.local")
    return failures


def check_job_security(batch_objs, overlay_objs) -> list[str]:
    """A batch Job runs as its own ServiceAccount, which the overlay it runs beside provides, token-less."""
    failures = []
    accounts = {o["metadata"]["name"]: o for o in of_kind(overlay_objs, "ServiceAccount")}
    servers = {pod(w).get("serviceAccountName") for w in of_kind(overlay_objs, *SERVER_KINDS)}
    for job in of_kind(batch_objs, "Job"):
        sa = pod(job).get("serviceAccountName")
        if not sa or sa == "default" or sa in servers:
            failures.append(f"{name(job)}: ServiceAccount {sa!r} is not one of its own")
        elif sa not in accounts and sa not in {o["metadata"]["name"] for o in of_kind(batch_objs, "ServiceAccount")}:
            failures.append(f"{name(job)}: ServiceAccount {sa} is provided neither by the overlay nor by the Job")
        if "cluster.local" in yaml.safe_dump(job):
            failures.append(f"{name(job)}: hard-codes the cluster domain cluster.local")
    return failures


# ----------------------------------------------------------------------------------------------------------------
def load(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def run(rendered: dict[str, list[dict]], nodes: dict) -> list[str]:
    """Every rule over every target; returns the failure lines."""
    failures: list[str] = []

    def report(rule: str, target: str, lines: list[str]) -> None:
        failures.extend(f"FAIL  policy {rule} {target}: {line}" for line in lines)

    overlays = {t: objs for t, objs in rendered.items() if of_kind(objs, *SERVER_KINDS)}
    gpu = {t: objs for t, objs in overlays.items() if t.startswith("overlays/") and t.split("/", 1)[1] in nodes}
    for target, objs in rendered.items():
        report("bundle-writes", target, check_bundle_writes(objs))
    for target, objs in overlays.items():
        report("security", target, check_security(objs))
    for target, objs in gpu.items():
        cloud = target.split("/", 1)[1]
        report("node-fit", target, check_node_fit(objs, nodes[cloud], cloud))
        report("learner-scaling", target, check_learner_scaling(objs))
        report("availability", target, check_availability(objs))
        for batch, batch_objs in rendered.items():
            if batch.startswith("batch/") and of_kind(batch_objs, "Job"):
                report("batch-load", f"{batch} on {target}", check_batch_load(batch_objs, objs, target))
                report("security", f"{batch} on {target}", check_job_security(batch_objs, objs))
                if bundle_writers(batch_objs):
                    report("bundle-writes", f"{batch} on {target}", check_bundle_versions(objs, batch_objs))
    return failures


def main(argv_: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", required=True, type=Path, help="k8s/nodes.yaml")
    parser.add_argument("rendered", nargs="+", metavar="TARGET=FILE", help="a rendered entry point")
    a = parser.parse_args(argv_)
    nodes = yaml.safe_load(a.nodes.read_text())
    rendered = {}
    for item in a.rendered:
        target, _, path = item.partition("=")
        rendered[target] = load(path)
    failures = run(rendered, nodes)
    for line in failures:
        print(line, file=sys.stderr)
    if failures:
        return 1
    print(f"k8s/policy.py: ok: {len(rendered)} renders hold every rule")
    return 0


if __name__ == "__main__":
    sys.exit(main())
