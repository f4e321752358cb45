"""infra/ agrees with itself and with the CLI: manifests parse and have the fields KubeRay and
Kubernetes need, one image everywhere, and every `salient ...` written in a manifest, script,
the Dockerfile or the README's Infra section is a real command with real options (a renamed
option would otherwise fail only at 02:00 on the cluster).

The manifests are also validated against the schemas the API server would use: KubeRay's CRDs
(vendored and trimmed under infra/k8s/schemas/, see vendor.py there) and Kubernetes' own
(kubernetes-validate) for the CronJob and every pod template, unknown fields refused as
`kubectl apply` refuses them. And for what a schema cannot see: token auth through KubeRay's
authOptions, the job specs the pods mount fit for a cluster (no loopback endpoint, no relative
sqlite store, GPU actors where the workers are GPU workers), the restricted securityContext."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from pipeline.cli import app
from pipeline.spec import cluster_problems, load_spec

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))
SCRIPTS = sorted((INFRA / "local").glob("*.sh"))
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CRD_SCHEMAS = sorted((INFRA / "k8s" / "schemas").glob("*.json"))
K8S_VERSION = "1.33.0"  # the Kubernetes schemas the manifests are checked against
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SHELL_BREAKS = {";", "&&", "||", "|", ">", ">>", "2>&1", "&"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in documents(p) if d["kind"] == kind]


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def containers(node) -> list[dict]:
    """Every container spec anywhere below node (pod templates of any resource)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(node, list):
        for value in node:
            found += containers(value)
    return found


def cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayCluster spec): the RayCluster's own, and the one each RayJob creates."""
    out = [(d["metadata"]["name"], d["spec"]) for d in by_kind("RayCluster")]
    out += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")]
    return out


# -- cron ------------------------------------------------------------------------------------
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_FIELDS = [(0, 59, None), (0, 23, None), (1, 31, None), (1, 12, _MONTHS), (0, 7, _DAYS)]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression: *, N, A-B, lists, /STEP, month and day names."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, _FIELDS, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\w+)(?:-(\w+))?)(?:/(\d+))?", part.lower())
            if not m or (m[4] is not None and int(m[4]) == 0):
                return False
            values = []
            for v in (m[2], m[3]):
                if v is None:
                    continue
                if v.isdigit():
                    values.append(int(v))
                elif names and v in names:
                    values.append(names.index(v) + (1 if names is _MONTHS else 0))
                else:
                    return False
            if any(not lo <= v <= hi for v in values) or values != sorted(values):
                return False
    return True


@pytest.mark.parametrize(
    "expr, ok",
    [
        ("0 2 * * *", True),
        ("*/15 0-6,22 1 jan-mar mon-fri", True),
        ("0 2 * *", False),
        ("60 2 * * *", False),
        ("0 2 * * 8", False),
        ("0 2 5-1 * *", False),
        ("0 2 * * */0", False),
        ("@daily", False),
    ],
)
def test_cron_validator(expr, ok):
    assert valid_cron(expr) is ok


# -- the salient commands written in infra ---------------------------------------------------
def cli_commands() -> dict[str, set[str]]:
    """command name -> its option spellings, from the typer app itself."""
    group = typer.main.get_command(app)
    return {
        name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for name, cmd in group.commands.items()
    }


def invocations(text: str) -> list[list[str]]:
    """Each `salient COMMAND ARGS...` in a command line (up to a shell separator)."""
    try:
        tokens = shlex.split(text, comments=False)
    except ValueError:
        tokens = text.split()
    found = []
    for i, tok in enumerate(tokens):
        at_command = i == 0 or tokens[i - 1] in SHELL_BREAKS | {"exec"} or "=" in tokens[i - 1]
        if Path(tok).name == "salient" and at_command and i + 1 < len(tokens):
            call = []
            for t in tokens[i + 1 :]:
                if t in SHELL_BREAKS:
                    break
                call.append(t.strip("[]"))  # [--optional] in usage lines
            found.append(call)
    return found


def command_lines(path: Path) -> list[str]:
    """Lines that may hold a command: YAML string values (folded blocks joined) and comments;
    script lines with `\\` continuations joined; comment markers stripped."""
    lines = []
    text = path.read_text()
    if path.suffix == ".yaml":
        lines += [s for d in documents(path) for s in strings(d)]
    joined = re.sub(r"\\\n\s*", " ", text)
    lines += [ln.strip().lstrip("#").strip() for ln in joined.splitlines()]
    return lines


def readme_infra() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Infra\n" in text, "README.md has no Infra section"
    return text.split("\n## Infra\n", 1)[1].split("\n## ", 1)[0]


def all_invocations() -> list[tuple[str, list[str]]]:
    out = []
    for path in [*MANIFESTS, *SCRIPTS, DOCKERFILE]:
        for line in command_lines(path):
            out += [(path.name, call) for call in invocations(line)]
    # the README's code only: fenced blocks and `inline` spans (prose says "salient command")
    section = readme_infra()
    code = [ln for b in re.findall(r"```\w*\n(.*?)```", section, re.S) for ln in b.splitlines()]
    code += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", section, flags=re.S))
    for line in code:
        out += [("README.md", call) for call in invocations(line)]
    return out


def test_every_salient_command_in_infra_exists_with_its_options():
    commands = cli_commands()
    calls = all_invocations()
    used = {call[0] for _, call in calls if call}
    assert {"run", "submit", "status", "logs"} <= used  # the scan found what is written
    for where, call in calls:
        assert call, f"{where}: `salient` without a command"
        assert call[0] in commands, f"{where}: `salient {call[0]}` is not a command"
        for tok in call[1:]:
            if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
                opt = tok.split("=", 1)[0]
                assert opt in commands[call[0]], f"{where}: `salient {call[0]}` has no {opt}"


# -- manifests -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_with_required_fields(path):
    docs = documents(path)
    assert docs, f"{path.name} is empty"
    for d in docs:
        for key in ("apiVersion", "kind", "metadata", "spec"):
            assert key in d, f"{path.name}: {d.get('kind')} lacks {key}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        for c in containers(d["spec"]):
            assert c.get("name") and c.get("image"), f"{path.name}: a container lacks name/image"


def test_manifests_are_the_expected_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for p in MANIFESTS for d in documents(p)}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob")} <= kinds


def test_ray_clusters_have_a_head_and_gpu_and_cpu_workers():
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    assert cluster_specs()
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == ray_pin, f"{name}: rayVersion differs from constraints.txt"
        head = spec["headGroupSpec"]
        assert containers(head["template"]), f"{name}: head has no container"
        assert all(isinstance(v, str) for v in head["rayStartParams"].values())
        groups = spec["workerGroupSpecs"]
        assert len({g["groupName"] for g in groups}) == len(groups)
        for g in groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
            assert all(isinstance(v, str) for v in g["rayStartParams"].values())
            assert containers(g["template"]), f"{name}/{g['groupName']}: no container"
        gpu = [g for g in groups if g["groupName"] == "gpu"]
        assert gpu, f"{name}: no GPU worker group"
        for c in containers(gpu[0]["template"]):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (name, spec), *_ = cluster_specs()  # the long-lived cluster also has CPU-only workers
    cpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"]
    assert cpu and all(
        "nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(cpu[0]["template"])
    )


def mounted_spec(pod: dict, path: str) -> str:
    """The ConfigMap key a pod reads at `path`: the mount of the path's folder, then the
    volume's item for the file's name."""
    spec_path = Path(path)
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(spec_path.parent)]]
    assert volume["configMap"]["name"] == "salient-specs"
    items = {i["path"]: i["key"] for i in volume["configMap"]["items"]}
    return items[spec_path.name]


def cronjob_call() -> tuple[dict, dict, list[str]]:
    """(the CronJob, its container, the `salient ...` call its shell runs)."""
    (cron,) = by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (call,) = invocations(" ".join(container.get("command", []) + container.get("args", [])))
    return cron, container, call


def mounted_specs() -> dict[str, str]:
    """Which job spec (jobs/<key>: the ConfigMap is made from these files) each manifest runs."""
    (job,) = by_kind("RayJob")
    call = shlex.split(job["spec"]["entrypoint"])
    assert call[:2] == ["salient", "run"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    cron, _, submit = cronjob_call()
    assert submit[0] == "submit"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {
        job["metadata"]["name"]: mounted_spec(head, call[2]),
        cron["metadata"]["name"]: mounted_spec(pod, submit[1]),
    }


def test_rayjob_and_cronjob_run_specs_mounted_from_the_configmap():
    keys = mounted_specs()
    assert keys == {"salient-explain": "explain-k8s.yaml", "salient-nightly": "nightly-k8s.yaml"}
    # the ConfigMap is made from jobs/ by the README's command, with every key the pods mount
    for key in keys.values():
        assert (ROOT / "jobs" / key).exists()
        assert f"--from-file={key}=jobs/{key}" in readme_infra(), key


def test_nightly_cronjob_submits_to_the_rayclusters_dashboard():
    cron, container, call = cronjob_call()
    assert valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert call[:2] == ["submit", "/specs/nightly-k8s.yaml"] and "--wait" in call
    options = dict(zip(call[2::2], call[3::2], strict=False))
    (cluster,) = by_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"]
    assert options["--address"] == f"http://{cluster['metadata']['name']}-head-svc:{dashboard}"
    # `$$` is Kubernetes' escape for `$`: the shell in the pod sees nightly-$(date +%F)
    assert "--submission-id nightly-$$(date +%F)" in " ".join(container["args"])


def test_one_image_everywhere():
    images = {c["image"] for p in MANIFESTS for d in documents(p) for c in containers(d)}
    assert len(images) == 1, images


# -- image and scripts -----------------------------------------------------------------------
def test_dockerfile_installs_the_package_and_runs_salient():
    lines = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines()
    instructions = [ln.split(None, 1) for ln in lines if ln.strip() and not ln.startswith("#")]
    first = {}
    for word, rest in instructions:
        first.setdefault(word.upper(), []).append(rest)
    assert re.match(r"(python:3\.11-slim|rayproject/ray:)", first["FROM"][0])
    assert json.loads(first["ENTRYPOINT"][-1]) == ["salient"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["salient"] == "pipeline.cli:app"
    # the dependencies at the lock's versions in a layer of their own, before the code
    order = [f"{word.upper()} {rest}" for word, rest in instructions]
    deps = next(i for i, x in enumerate(order) if "pip install -c requirements.lock -r" in x)
    code = next(i for i, x in enumerate(order) if x.startswith("COPY pipeline "))
    package = next(i for i, x in enumerate(order) if "pip install --no-deps" in x)
    assert order[deps - 1] == "COPY pyproject.toml requirements.lock ./"
    assert deps < code < package
    assert first["USER"][-1] == "1000:1000"  # = the manifests' runAsUser
    assert not any("jobs" in rest for rest in first["COPY"])  # specs come from the ConfigMap
    copied = [src for rest in first["COPY"] for src in rest.split()[:-1]]
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is kept out of the context"


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.split("#")[0].strip().partition("==")
            out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_the_lock_agrees_with_the_constraints():
    """make installs with both as constraints, the image with the lock: one version each."""
    lock, constraints = pins(ROOT / "requirements.lock"), pins(ROOT / "constraints.txt")
    assert all(lock.values()) and "salient-pipeline" not in lock  # exact pins, not the package
    # cosmic-ray (make mutation) is not in the test environment, so not in the lock
    assert {n: v for n, v in constraints.items() if lock.get(n, v) != v} == {}
    assert set(constraints) - set(lock) <= {"cosmic-ray"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_stop_only_their_own(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
    code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    for word in ("ray stop", "pkill", "killall"):
        assert not any(word in ln for ln in code), f"{path.name} uses {word!r}"


def test_readme_crontab_lines_are_valid():
    blocks = re.findall(r"```crontab\n(.*?)```", readme_infra(), re.S)
    entries = [ln for b in blocks for ln in b.splitlines() if ln.strip() and ln[0] != "#"]
    assert entries
    for entry in entries:
        assert valid_cron(" ".join(entry.split()[:5])), entry
        assert not re.search(r"(?<!\\)%", entry), f"cron turns a bare % into a newline: {entry}"
        assert invocations(" ".join(entry.split()[5:]))


# -- schemas: KubeRay's CRDs (vendored) and Kubernetes' own -----------------------------------
def closed(schema):
    """An OpenAPI schema with unknown fields refused where the API server refuses them (kubectl
    applies with strict field validation): every object that lists its properties and does
    not keep unknown fields."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def crd_validators() -> dict[str, jsonschema.Validator]:
    out = {}
    for path in CRD_SCHEMAS:
        vendored = json.loads(path.read_text())
        assert vendored["source"].startswith("ray-project/kuberay v1.6"), path.name
        out[vendored["kind"]] = jsonschema.Draft7Validator(closed(vendored["schema"]))
    return out


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod a manifest makes."""
    kind, spec = doc["kind"], doc["spec"]
    if kind == "CronJob":
        return [("jobTemplate", spec["jobTemplate"]["spec"]["template"])]
    out = [("submitterPodTemplate", spec["submitterPodTemplate"])] if kind == "RayJob" else []
    cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
    out.append(("headGroupSpec", cluster["headGroupSpec"]["template"]))
    out += [
        (f"workerGroupSpecs/{g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]
    ]
    return out


ALL_DOCS = [(p.name, d) for p in MANIFESTS for d in documents(p)]


@pytest.mark.parametrize("name, doc", ALL_DOCS, ids=[f"{n}:{d['kind']}" for n, d in ALL_DOCS])
def test_manifest_matches_the_api_servers_schemas(name, doc):
    if doc["apiVersion"] == "ray.io/v1":
        errors = sorted(crd_validators()[doc["kind"]].iter_errors(doc), key=str)
        assert not errors, "\n".join(
            f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # the pod templates (trimmed from the vendored CRDs) against Kubernetes' PodTemplateSpec
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        try:
            kubernetes_validate.validate({**wrapped, "template": template}, K8S_VERSION, True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {where}: {e.message} at {list(e.caught.absolute_path)}")


def test_the_schema_check_refuses_what_kubectl_refuses():
    (cluster,) = by_kind("RayCluster")
    validator = crd_validators()["RayCluster"]
    assert not list(validator.iter_errors(cluster))
    for bad in (
        {**cluster, "spec": {**cluster["spec"], "authOptions": {"mode": "tokens"}}},
        {**cluster, "spec": {**cluster["spec"], "authOption": {"mode": "token"}}},
        {**cluster, "spec": {**cluster["spec"], "rayVersion": 2.6}},
    ):
        assert list(validator.iter_errors(bad)), bad["spec"]
    (template,) = [t for w, t in pod_templates(cluster) if w == "headGroupSpec"]
    container = {**template["spec"]["containers"][0], "securityContxt": {}}
    broken = {**template, "spec": {**template["spec"], "containers": [container]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": broken,
            },
            K8S_VERSION,
            True,
        )


# -- semantics ---------------------------------------------------------------------------------
def test_ray_token_auth_is_kuberays_and_the_cronjob_reads_the_same_secret_key():
    secrets = set()
    for name, spec in cluster_specs():
        auth = spec.get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: no token auth"
        secrets.add(auth["secretName"])
        # KubeRay refuses token auth below Ray 2.52
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0), name
    assert len(secrets) == 1, secrets  # one Secret for the long-lived cluster and the RayJob
    # KubeRay sets RAY_AUTH_MODE / RAY_AUTH_TOKEN in Ray's pods; set by hand they would win
    for doc in by_kind("RayCluster") + by_kind("RayJob"):
        for c in containers(doc["spec"]):
            names = [e["name"] for e in c.get("env", [])]
            assert not [n for n in names if n.startswith("RAY_AUTH")], (doc["kind"], c["name"])
    # the CronJob's submitter is no Ray pod: it reads the key KubeRay reads (`auth_token`)
    _, container, _ = cronjob_call()
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secrets.pop(), "auth_token")
    # and the README makes that Secret with that key
    assert f"kubectl create secret generic {ref['name']} --from-literal=auth_token=" in (
        readme_infra()
    )


def gpus(template: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in template["spec"]["containers"]
    )


def test_the_mounted_specs_are_fit_for_their_cluster():
    clusters = {}
    (cluster,) = by_kind("RayCluster")
    (job,) = by_kind("RayJob")
    clusters["salient-nightly"] = cluster["spec"]  # the CronJob submits to the RayCluster
    clusters["salient-explain"] = job["spec"]["rayClusterSpec"]
    for manifest, key in mounted_specs().items():
        spec = load_spec(ROOT / "jobs" / key, resolve_paths=False)
        assert cluster_problems(spec) == [], (key, cluster_problems(spec))
        assert spec.storage.endpoint_url is None or "://" in spec.storage.endpoint_url
        # recorded to the cluster's MLflow server, written in the spec (not the env's luck)
        assert "uri" in spec.tracking.model_fields_set
        assert spec.tracking.uri.startswith(("http://", "https://")), key
        for uri in (spec.source.uri, spec.output.uri):
            assert "://" in uri, f"{key}: {uri} is a local path"
        groups = clusters[manifest]["workerGroupSpecs"]
        per_worker = max(gpus(g["template"]) for g in groups)
        if per_worker:  # GPU workers exist: the actors must ask for them
            assert 0 < spec.compute.gpus_per_actor <= per_worker, key
        if manifest == "salient-explain":  # a fixed-size cluster: every actor finds its GPU
            total = sum(g["maxReplicas"] * gpus(g["template"]) for g in groups)
            assert spec.compute.actors * spec.compute.gpus_per_actor <= total
    # a spec that leaves tracking.uri out would use the head's MLFLOW_TRACKING_URI: the same
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head.get("env", [])}
    nightly = load_spec(ROOT / "jobs" / mounted_specs()["salient-nightly"], resolve_paths=False)
    assert env.get("MLFLOW_TRACKING_URI", nightly.tracking.uri) == nightly.tracking.uri


def test_the_local_specs_stay_local_and_the_cluster_specs_are_theirs():
    # jobs/explain.yaml and demo.yaml serve the local stack: what cluster_problems finds there
    # is why the manifests mount the *-k8s.yaml specs instead
    explain = cluster_problems(load_spec(ROOT / "jobs" / "explain.yaml", resolve_paths=False))
    assert [p.split(":")[0] for p in explain] == ["storage.endpoint_url", "tracking.uri"]


@pytest.mark.parametrize("name, doc", ALL_DOCS, ids=[f"{n}:{d['kind']}" for n, d in ALL_DOCS])
def test_every_pod_is_restricted(name, doc):
    """Pod Security "restricted": non-root as the image's user, no privilege escalation, no
    capabilities, the runtime's seccomp profile; also KubeRay's autoscaler sidecar (and its
    wait-gcs-ready init container, which copies the Ray container's securityContext)."""
    templates = pod_templates(doc)
    assert templates
    for where, template in templates:
        pod = template["spec"].get("securityContext", {})
        for key, want in RESTRICTED_POD.items():
            assert pod.get(key) == want, f"{name} {where}: securityContext.{key}"
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            ctx = c.get("securityContext", {})
            for key, want in RESTRICTED_CONTAINER.items():
                assert ctx.get(key) == want, f"{name} {where}/{c['name']}: securityContext.{key}"
    if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
        ctx = doc["spec"].get("autoscalerOptions", {}).get("securityContext", {})
        assert all(ctx.get(k) == v for k, v in RESTRICTED_CONTAINER.items()), "autoscaler"
