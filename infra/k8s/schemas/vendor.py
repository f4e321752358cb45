"""Write the trimmed KubeRay CRD schemas that tests/test_infra.py validates the manifests with.

    git -C KUBERAY show v1.6.2:ray-operator/config/crd/bases/ray.io_rayclusters.yaml \
        | python infra/k8s/schemas/vendor.py "ray-project/kuberay v1.6.2 (598eb66a) ..." \
        > infra/k8s/schemas/raycluster-v1.6.2.json
    (and ray.io_rayjobs.yaml > rayjob-v1.6.2.json)

Kept: the CRD's openAPIV3Schema of version v1, without descriptions. Trimmed: every pod
template (an object with `metadata` and a `spec` holding `containers`), replaced by an object
that accepts anything; the test validates those templates as Kubernetes PodTemplates against
Kubernetes' own schema (kubernetes-validate), which is stricter and current.
"""

from __future__ import annotations

import json
import sys

import yaml

TRIMMED = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "x-salient-trimmed": "pod template: validated against Kubernetes' PodTemplateSpec",
}


def is_pod_template(node: dict) -> bool:
    props = node.get("properties", {})
    spec = props.get("spec", {}).get("properties", {})
    return "metadata" in props and "containers" in spec


def trim(node):
    if isinstance(node, dict):
        if is_pod_template(node):
            return dict(TRIMMED)
        return {k: trim(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [trim(v) for v in node]
    return node


def main() -> None:
    crd = yaml.safe_load(sys.stdin)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = trim(version["schema"]["openAPIV3Schema"])
    out = {
        "source": sys.argv[1] if len(sys.argv) > 1 else None,
        "kind": crd["spec"]["names"]["kind"],
        "group": crd["spec"]["group"],
        "schema": schema,
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
