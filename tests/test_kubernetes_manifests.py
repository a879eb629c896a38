"""deploy/kubernetes, checked: every core resource against the Kubernetes OpenAPI schema
(kubernetes-validate, strict: an unknown or misspelt field fails), both kustomizations
rendered by `kubectl kustomize` when kubectl is here, and what the schema cannot see —
probes on the right paths, the grace period sized for shutdown_grace, the Secret mounted
as a directory, the cert-manager resources wired to the Secret the pods mount.

cert-manager's Issuer and Certificate are CRDs, not in the core schema: their structure
is checked here by hand (apiVersion, kind, the fields the recipe relies on)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (it is in the `test` extra)"
)

from proxy.config.values import parse_duration  # noqa: E402

KUBERNETES = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
SCHEMA_VERSION = kubernetes_validate.latest_version()
CERT_MANAGER = "cert-manager.io/v1"
KUSTOMIZE = "kustomize.config.k8s.io/v1beta1"
MANIFESTS = sorted(KUBERNETES.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def every_resource() -> list[dict]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["apiVersion"] != KUSTOMIZE]


def one(kind: str, recipe: Path = KUBERNETES / "base") -> dict:
    found = [doc for path in sorted(recipe.glob("*.yaml")) for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} in {recipe}"
    return found[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_core_resource_validates_strictly(path: Path) -> None:
    for doc in documents(path):
        if doc["apiVersion"] in (KUSTOMIZE, CERT_MANAGER):
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # not core: checked below
                kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)  # raises ValidationError


def test_the_validator_does_catch_a_mistake() -> None:
    deployment = one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, SCHEMA_VERSION, strict=True)


@pytest.mark.parametrize("recipe", [KUBERNETES, KUBERNETES / "cert-manager"], ids=["secret", "cert-manager"])
def test_each_kustomization_renders_and_validates(recipe: Path) -> None:
    listed = documents(recipe / "kustomization.yaml")[0]["resources"]
    assert all((recipe / entry).exists() for entry in listed), listed
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomization's files exist, rendering is not checked")
    result = subprocess.run([kubectl, "kustomize", str(recipe)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"]
    if recipe.name == "cert-manager":
        expected = sorted([*expected, "Certificate", "Issuer"])
    assert kinds == expected
    secrets = [doc["metadata"]["name"] for doc in rendered if doc["kind"] == "Secret"]
    # the Secret-based recipe ships tlsproxy-certs; with cert-manager, the Certificate writes it
    assert secrets == (["tlsproxy-ca"] if recipe.name == "cert-manager" else ["tlsproxy-certs"])
    for doc in rendered:
        if doc["apiVersion"] != CERT_MANAGER:
            kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)


def listed_in_kustomizations() -> set[Path]:
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        listed |= {(kustomization.parent / entry).resolve() for entry in documents(kustomization)[0]["resources"]}
    return listed


def test_no_manifest_is_left_out_of_the_recipes() -> None:
    listed = listed_in_kustomizations()
    stray = [path for path in MANIFESTS if path.name != "kustomization.yaml" and path.resolve() not in listed]
    assert stray == []


def _container() -> dict:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_ask_readyz_and_healthz_on_the_admin_port() -> None:
    container = _container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = yaml.safe_load(one("ConfigMap")["data"]["proxy.yaml"])
    env = {item["name"]: item["value"] for item in container["env"]}
    admin = config["admin"]["listen"].replace("${TLSPROXY_ADMIN:-0.0.0.0:9901}", env["TLSPROXY_ADMIN"])
    assert admin == f"0.0.0.0:{ports['admin']}"  # the pod IP, where kubelet probes


def test_grace_period_covers_the_pre_stop_pause_and_shutdown_grace() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = " ".join(_container()["lifecycle"]["preStop"]["exec"]["command"])
    pause = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", command).group(1))
    config = yaml.safe_load(one("ConfigMap")["data"]["proxy.yaml"])
    grace = parse_duration(config["timeouts"]["shutdown_grace"])
    # kubelet's clock starts before preStop; the drain must end before SIGKILL
    assert pod["terminationGracePeriodSeconds"] >= pause + grace + 5, (pause, grace)


def test_the_certificate_secret_is_mounted_as_a_directory() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = _container()["volumeMounts"]
    assert all("subPath" not in mount and "subPathExpr" not in mount for mount in mounts)  # subPath never updates
    certs = next(mount for mount in mounts if volumes[mount["name"]].get("secret"))
    assert volumes[certs["name"]]["secret"]["secretName"] == "tlsproxy-certs"
    config = yaml.safe_load(one("ConfigMap")["data"]["proxy.yaml"])
    files = [config["tls"]["certificates"][0]["cert"], config["tls"]["certificates"][0]["key"], config["client_auth"]["ca"]]
    assert [Path(file).parent for file in files] == [Path(certs["mountPath"])] * 3
    assert {Path(file).name for file in files} == {"tls.crt", "tls.key", "ca.crt"}  # what a cert-manager Secret holds


def test_the_disruption_budget_keeps_one_pod() -> None:
    budget = one("PodDisruptionBudget")
    deployment = one("Deployment")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_cert_manager_recipe_is_wired_to_the_mounted_secret() -> None:
    recipe = KUBERNETES / "cert-manager"
    issuer, certificate, ca_secret = one("Issuer", recipe), one("Certificate", recipe), one("Secret", recipe)
    assert issuer["apiVersion"] == certificate["apiVersion"] == CERT_MANAGER
    assert set(issuer["spec"]) == {"ca"} and issuer["spec"]["ca"]["secretName"] == ca_secret["metadata"]["name"]
    assert ca_secret["type"] == "kubernetes.io/tls" and set(ca_secret["stringData"]) == {"tls.crt", "tls.key"}
    spec = certificate["spec"]
    assert spec["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
    assert spec["secretName"] == "tlsproxy-certs"  # what the Deployment mounts
    service = one("Service")["metadata"]["name"]
    assert service in spec["dnsNames"] and f"{service}.default.svc.cluster.local" in spec["dnsNames"]
    assert "server auth" in spec["usages"]
    assert parse_duration(spec["renewBefore"]) < parse_duration(spec["duration"])
