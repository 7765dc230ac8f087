#!/usr/bin/env bash
# Render every Kustomize entry point under k8s/ and validate each object against the Kubernetes OpenAPI
# schemas, strictly (unknown fields are errors), offline; then check the deployment policy (k8s/policy.py) over
# the renders. Exit status 0 only when everything passed.
#
#   k8s/validate.sh                  # from anywhere; `make k8s-validate` runs it
#   K8S_VERSIONS="1.34.0" k8s/validate.sh
#
# Environment:
#   KUBECTL               kubectl with Kustomize >= 5 (default: kubectl on PATH)
#   KUBERNETES_VALIDATE   the kubernetes-validate program (default: .venv/bin/kubernetes-validate, else PATH)
#   PYTHON                Python with PyYAML, for k8s/policy.py (default: .venv/bin/python, else python3)
#   K8S_VERSIONS          Kubernetes versions to validate against (default: "1.33.0 1.37.0": the oldest we
#                         support, since backoffLimitPerIndex is GA from 1.33, and the newest schemas bundled)
#
# Custom resources (the optional ServiceMonitor component) have no schema in kubernetes-validate: they are
# listed as skipped. Any other object without a schema (a misspelt kind or apiVersion) is a failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

KUBECTL="${KUBECTL:-kubectl}"
if ! command -v "$KUBECTL" >/dev/null 2>&1; then
    echo "k8s/validate.sh: '$KUBECTL' not found: install kubectl (it bundles Kustomize) or set KUBECTL=/path/to/kubectl" >&2
    exit 2
fi
if [[ -z "${KUBERNETES_VALIDATE:-}" ]]; then
    if [[ -x "$root/.venv/bin/kubernetes-validate" ]]; then
        KUBERNETES_VALIDATE="$root/.venv/bin/kubernetes-validate"
    elif command -v kubernetes-validate >/dev/null 2>&1; then
        KUBERNETES_VALIDATE="$(command -v kubernetes-validate)"
    else
        echo "k8s/validate.sh: kubernetes-validate not found: run 'make install' (dev extras) or set KUBERNETES_VALIDATE" >&2
        exit 2
    fi
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
read -r -a versions <<< "${K8S_VERSIONS:-1.33.0 1.37.0}"
# Kinds that come from CRDs, not from Kubernetes itself.
crd_kinds="ServiceMonitor"

# Every entry point: the overlays, the batch Jobs, and overlays with the optional components (ServiceMonitor,
# bundle image volume).
targets=(overlays/gke overlays/eks overlays/aks overlays/dev-cpu batch/extract batch/extract-bucket
         batch/assemble-bundle examples/gke-with-servicemonitor examples/gke-with-bundle-image)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failed=0
files=()
pairs=()
skipped=()
render() {  # render NAME DIR
    local out="$tmp/$(echo "$1" | tr '/' '_').yaml"
    if "$KUBECTL" kustomize "$2" > "$out" 2> "$out.err"; then
        files+=("$out")
        pairs+=("$1=$out")
    else
        echo "FAIL  kubectl kustomize $1:" >&2
        sed 's/^/      /' "$out.err" >&2
        failed=1
    fi
}
for t in "${targets[@]}"; do
    render "$t" "$here/$t"
done

if (( ${#files[@]} )); then
    kv_args=(--strict --quiet)
    for v in "${versions[@]}"; do kv_args+=(-k "$v"); done
    set +e
    report="$("$KUBERNETES_VALIDATE" "${kv_args[@]}" "${files[@]}" 2>&1)"
    rc=$?
    set -e
    while IFS= read -r line; do
        [[ -z "$line" ]] && continue
        line="${line//$tmp\//}"
        if [[ "$line" == WARN* ]] && [[ "$line" =~ for\ kind\ ([A-Za-z]+)\  ]] && [[ " $crd_kinds " == *" ${BASH_REMATCH[1]} "* ]]; then
            skipped+=("skip  ${line#WARN } (custom resource: no bundled schema)")
        elif [[ "$line" == WARN* ]]; then
            echo "FAIL  ${line#WARN } (no schema: misspelt kind or apiVersion?)" >&2
            failed=1
        else
            echo "FAIL  $line" >&2
            failed=1
        fi
    done <<< "$report"
    if (( rc != 0 )); then
        failed=1
    fi
    if (( ${#skipped[@]} )); then
        printf '%s\n' "${skipped[@]}" | sort | uniq -c | sed 's/^ *\([0-9]*\) /\1x /'
    fi
fi

# What schemas cannot see: bundles written inside volumes, pods that fit the documented GPU machines, learner
# scaling and draining, batch load, availability and roll-outs, ServiceAccounts and NetworkPolicies (policy.py).
if (( ${#pairs[@]} )); then
    if ! "$PYTHON" "$here/policy.py" --nodes "$here/nodes.yaml" "${pairs[@]}" 2> "$tmp/policy.err"; then
        sed "s|$tmp/||g" "$tmp/policy.err" >&2
        failed=1
    fi
fi

if (( failed )); then
    echo "k8s/validate.sh: FAILED" >&2
    exit 1
fi
echo "k8s/validate.sh: ok: ${#files[@]} renders (${targets[*]}) valid for Kubernetes ${versions[*]} (--strict) and hold the deployment policy (k8s/policy.py)"
