"""The Kubernetes manifests (images/k8s/): the example overlay rendered, every object valid against
the API schemas of a pinned Kubernetes version (kubernetes-validate, offline), and what the pod
needs from them: Guaranteed QoS, no API token, a grace covering drain + shutdown of the pod's own
config, probes on the config's ports with the right meaning, the monitoring objects matching the
alert rules and the metrics.

The kustomization is rendered by :func:`render`, a renderer of the subset of kustomize the
manifests use (resources, namespace, configMapGenerator / secretGenerator without hash suffixes);
it refuses any other field. Where ``kubectl`` (with its built-in kustomize) is on PATH, its
rendering must be the same objects."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor import config as wsup_config
from supervisor import metrics

K8S = Path(__file__).resolve().parent.parent / "images" / "k8s"
OVERLAY = K8S / "overlays" / "example"
KUBERNETES_VERSION = "1.34.0"  # the oldest with GKE writable cgroups (images/k8s/README.md)
NAME = "workspace-supervisor"

Obj = dict[str, Any]

# ---- a renderer for the kustomize subset used -----------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "generatorOptions", "configMapGenerator", "secretGenerator"}
CLUSTER_SCOPED = {"Namespace"}


def render(directory: Path) -> list[Obj]:
    """The objects the kustomization in ``directory`` produces."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not implement {sorted(unknown)}"
    assert spec.get("generatorOptions", {}) == {"disableNameSuffixHash": True} or not (
        spec.get("configMapGenerator") or spec.get("secretGenerator")
    ), "generators need generatorOptions.disableNameSuffixHash: true (the renderer makes no hashes)"
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in spec.get("secretGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {Path(f).name: base64.b64encode((directory / f).read_bytes()).decode() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": gen["name"]}, "data": data})
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of images/k8s with the keys an operator adds to the example overlay (never committed)."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root)
    example = root / "overlays" / "example"
    (example / "jwt-public.pem").write_text("-----BEGIN PUBLIC KEY-----\nexample\n-----END PUBLIC KEY-----\n")
    (example / "cookie.key").write_bytes(b"k" * 48)
    return example


@pytest.fixture(scope="module")
def objects(overlay: Path) -> list[Obj]:
    return render(overlay)


def one(objects: list[Obj], kind: str, name: str = NAME) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pod(objects: list[Obj]) -> Obj:
    spec: Obj = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: Obj) -> Obj:
    (only,) = pod["containers"]
    return only  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pod_config(objects: list[Obj], container: Obj) -> wsup_config.Config:
    """The daemon's config as a pod loads it: the ConfigMap's config.toml plus the container's
    WSUP_* environment (with a pod IP substituted)."""
    text = one(objects, "ConfigMap", f"{NAME}-config")["data"]["config.toml"]
    env = {e["name"]: e["value"].replace("$(POD_IP)", "10.1.2.3") for e in container["env"] if e["name"].startswith("WSUP_")}
    return wsup_config.from_dict(tomllib.loads(text), env)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def named_port(container: Obj, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port  # type: ignore[no-any-return]


def mount_of(container: Obj, volume: str) -> Obj:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return mount  # type: ignore[no-any-return]


def volume_of(pod: Obj, container: Obj, path: Path) -> tuple[Obj, str]:
    """The pod volume mounted at ``path`` (or the directory holding it) and the file name in it."""
    for mount in container["volumeMounts"]:
        mount_path = Path(mount["mountPath"])
        if path == mount_path and "subPath" in mount:
            key = mount["subPath"]
        elif path.parent == mount_path:
            key = path.name
        else:
            continue
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        return volume, key
    raise AssertionError(f"nothing is mounted at {path}")


# ---- every object valid ----------------------------------------------------------------------------


def test_every_object_is_valid_against_the_pinned_kubernetes_api(objects: list[Obj]) -> None:
    import kubernetes_validate

    builtin = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in builtin} >= {
        "Namespace", "ServiceAccount", "PersistentVolumeClaim", "StatefulSet", "Service", "ConfigMap", "Secret",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
    }
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_refuses_a_broken_object(container: Obj, objects: list[Obj]) -> None:
    """The validation above has teeth: a misspelt field and a wrong type are refused."""
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(one(objects, "StatefulSet"))
    broken["spec"]["template"]["spec"]["automountServiceAcountToken"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(one(objects, "StatefulSet"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_prometheus_operator_objects_have_the_structure_it_reads(objects: list[Obj]) -> None:
    """ServiceMonitor and PrometheusRule are CRDs kubernetes-validate has no schema for: checked here
    by hand, the fields Prometheus Operator reads."""
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in objects if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"} and "expr" in r
            assert all(isinstance(v, str) for v in [*r.get("labels", {}).values(), *r.get("annotations", {}).values()])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is not installed")
def test_kubectl_kustomize_renders_the_same_objects(overlay: Path, objects: list[Obj]) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    def key(o: Obj) -> tuple[str, str]:
        return (o["kind"], o["metadata"]["name"])

    theirs = sorted((o for o in yaml.safe_load_all(out.stdout) if o), key=key)
    for o in theirs:
        if o["kind"] == "Secret":  # kustomize wraps base64 at 76 columns
            o["data"] = {k: "".join(v.split()) for k, v in o["data"].items()}
    assert sorted(objects, key=key) == theirs


def test_the_prometheusrule_is_generated_from_the_alert_rules() -> None:
    check = subprocess.run([sys.executable, str(K8S / "gen-prometheusrule"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    alerts = yaml.safe_load((K8S.parent / "alerts" / "workspace-supervisor.rules.yml").read_text())
    generated = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    assert generated["spec"]["groups"] == alerts["groups"]


# ---- what the pod needs ------------------------------------------------------------------------------


def test_guaranteed_qos(pod: Obj) -> None:
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        resources = c["resources"]
        assert resources["requests"] == resources["limits"]
        assert set(resources["limits"]) >= {"cpu", "memory"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "16Gi"}


def test_no_service_account_token(objects: list[Obj], pod: Obj) -> None:
    assert pod["automountServiceAccountToken"] is False
    account = one(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert not any("projected" in v for v in pod["volumes"])


def test_the_init_is_the_entrypoint_with_the_mounted_config(container: Obj, pod: Obj) -> None:
    command = container["command"]
    assert command[:3] == ["workspace-supervisor", "init", "--"]
    config_path = Path(command[command.index("--config") + 1])
    volume, key = volume_of(pod, container, config_path)
    assert volume["configMap"]["name"] == f"{NAME}-config" and key == "config.toml"
    assert container["image"] == "workspace-supervisor:dev"


def test_grace_covers_drain_and_shutdown(pod: Obj, pod_config: wsup_config.Config) -> None:
    daemon = pod_config.daemon
    assert pod["terminationGracePeriodSeconds"] >= daemon.drain_deadline + daemon.shutdown_deadline + 10


def test_pod_config_matches_the_container(container: Obj, pod_config: wsup_config.Config) -> None:
    assert pod_config.pod.memory == 16 * 2**30  # the memory limit
    assert pod_config.pod.address == f"10.1.2.3:{port_of(pod_config.http.listen)}"
    assert named_port(container, "frontdoor") == port_of(pod_config.http.listen)
    assert named_port(container, "probes") == port_of(pod_config.probes.listen)


def test_probes_ask_the_right_questions_on_the_probe_port(container: Obj, pod_config: wsup_config.Config) -> None:
    """Liveness: the daemon answers. Readiness: the pod serves the users it has - /readyz, which
    stays 200 when the pod is full or draining (/admitting means "admits new users")."""
    paths = {}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "probes"
        paths[probe] = get["path"]
    assert paths == {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/startupz"}
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 30, "outlast the init's longest restart backoff (30 s)"


def test_files_the_config_names_are_mounted(objects: list[Obj], pod: Obj, container: Obj, pod_config: wsup_config.Config) -> None:
    auth = pod_config.auth
    assert auth.public_key_file is not None and auth.cookie_secret_file is not None
    for path in (auth.public_key_file, auth.cookie_secret_file):
        volume, key = volume_of(pod, container, path)
        secret = one(objects, "Secret", volume["secret"]["secretName"])
        assert key in secret["data"]
        assert volume["secret"]["defaultMode"] == 0o400, "root-only: users run as other uids"
    volume, key = volume_of(pod, container, pod_config.registry.fdb_cluster_file)
    assert key in one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    assert pod_config.registry.backend == "fdb"
    workspace = mount_of(container, "workspaces")
    assert Path(workspace["mountPath"]) == pod_config.workspace.root
    (volume,) = [v for v in pod["volumes"] if v["name"] == "workspaces"]
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mounted = {Path(m["mountPath"]) for m in container["volumeMounts"]}
    assert {pod_config.daemon.state_dir, pod_config.daemon.run_dir, pod_config.daemon.log_dir} <= mounted
    assert Path("/dev/net/tun") in mounted


def test_kernel_features_are_granted_and_admitted(objects: list[Obj], container: Obj) -> None:
    context = container["securityContext"]
    assert context.get("privileged") is True or {"SYS_ADMIN", "NET_ADMIN"} <= set(context["capabilities"]["add"])
    namespace = one(objects, "Namespace", one(objects, "StatefulSet")["metadata"]["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_disruption_budget_and_autoscaler_on_active_users(objects: list[Obj]) -> None:
    budget = one(objects, "PodDisruptionBudget")
    labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in one(objects, "StatefulSet")["spec"], "the autoscaler owns the count"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": NAME}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "workspace_supervisor_active_users"
    assert name in {m.name for m in metrics.REGISTRY.collect()}
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    (rule,) = adapter["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_network_policy_front_door_from_ingress_metrics_from_monitoring(objects: list[Obj], pod_config: wsup_config.Config) -> None:
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    allowed = {}
    for rule in policy["ingress"]:
        ((peer,), (port,)) = (rule["from"], rule["ports"])
        assert set(peer) == {"namespaceSelector"}, "namespaces only, never every pod"
        allowed[port["port"]] = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert allowed == {port_of(pod_config.http.listen): "ingress-nginx", port_of(pod_config.probes.listen): "monitoring"}


def test_services_reach_the_named_ports(objects: list[Obj], container: Obj) -> None:
    names = {p["name"] for p in container["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    targets = {p["targetPort"] for s in services for p in s["spec"]["ports"]}
    assert targets == names == {"frontdoor", "probes"}
    governing = one(objects, "Service", one(objects, "StatefulSet")["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"


def test_every_yaml_file_parses() -> None:
    files = list(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        assert all(doc is not None for doc in yaml.safe_load_all(path.read_text())), path
