"""packaging/kubernetes/ validated offline: the Pod and NetworkPolicy parts against the
Kubernetes JSON schemas shipped in the pinned kubernetes-validate package (strict: no
unknown fields), the agent-sandbox `Sandbox` envelope by structure (its CRD schema is
not packaged anywhere we can install from), and what the recipes promise."""

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

K8S = REPO / "packaging" / "kubernetes"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# SandboxSpec fields of agents.x-k8s.io/v1alpha1 (agent-sandbox's API reference).
SANDBOX_SPEC_FIELDS = {"podTemplate", "volumeClaimTemplates", "shutdownTime", "shutdownPolicy", "replicas", "service"}


def docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def sandbox_of(name):
    (s,) = [d for d in docs(name) if d["kind"] == "Sandbox"]
    return s


def as_pod(sandbox):
    """The Pod the agent-sandbox controller makes from the Sandbox's podTemplate."""
    tpl = sandbox["spec"]["podTemplate"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": sandbox["metadata"]["name"], **copy.deepcopy(tpl.get("metadata", {}))},
        "spec": copy.deepcopy(tpl["spec"]),
    }


def validate(resource):
    for v in VERSIONS:
        kubernetes_validate.validate(resource, v, strict=True)


@pytest.mark.parametrize("name", ["sandbox.yaml", "sandbox-init-container.yaml"])
def test_sandbox_envelope_and_pod_template(name):
    s = sandbox_of(name)
    assert s["apiVersion"] == "agents.x-k8s.io/v1alpha1"
    assert set(s) <= {"apiVersion", "kind", "metadata", "spec"}
    assert s["metadata"]["name"]
    assert set(s["spec"]) <= SANDBOX_SPEC_FIELDS, set(s["spec"]) - SANDBOX_SPEC_FIELDS
    assert set(s["spec"]["podTemplate"]) <= {"metadata", "spec"}
    assert set(s["spec"]["podTemplate"].get("metadata", {})) <= {"labels", "annotations"}
    validate(as_pod(s))


def test_the_schema_check_can_fail():
    """A typo in the pod template must be caught (the validation is strict)."""
    pod = as_pod(sandbox_of("sandbox.yaml"))
    pod["spec"]["containers"][0]["readinessProbes"] = pod["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(pod)


def test_network_policies_are_valid_and_deny_by_default():
    policies = [d for d in docs("sandbox.yaml") if d["kind"] == "NetworkPolicy"]
    for p in policies:
        validate(p)
    labels = sandbox_of("sandbox.yaml")["spec"]["podTemplate"]["metadata"]["labels"]
    deny = [p for p in policies if "ingress" not in p["spec"] and "egress" not in p["spec"]]
    assert len(deny) == 1
    spec = deny[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    # The only opening: the router, to guestd's two ports.
    (allow,) = [p for p in policies if "ingress" in p["spec"]]
    ports = sorted(port["port"] for rule in allow["spec"]["ingress"] for port in rule["ports"])
    assert ports == [49983, 49999]
    assert "egress" not in allow["spec"]


def test_sandbox_probes_resources_and_envd_flags():
    pod = as_pod(sandbox_of("sandbox.yaml"))["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["--isnotfc", "--no-cgroups", "--port", "49983", "--verbose"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named == {"agent": 49983, "code": 49999}
    probes = {k: (c[k]["httpGet"]["path"], named[c[k]["httpGet"]["port"]])
              for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {
        "startupProbe": ("/health", 49983),
        "livenessProbe": ("/health", 49983),
        "readinessProbe": ("/health", 49999),
    }
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False


def test_init_container_copies_the_binary_into_an_emptydir():
    pod = as_pod(sandbox_of("sandbox-init-container.yaml"))["spec"]
    (vol,) = pod["volumes"]
    assert "emptyDir" in vol
    (init,) = pod["initContainers"]
    (mount,) = init["volumeMounts"]
    assert mount["name"] == vol["name"]
    assert init["command"][0] == "cp" and init["command"][-1].startswith(mount["mountPath"] + "/")
    (c,) = pod["containers"]
    hook = " ".join(c["lifecycle"]["postStart"]["exec"]["command"])
    assert init["command"][-1] + " -isnotfc" in hook
    assert any(m["name"] == vol["name"] and m.get("readOnly") for m in c["volumeMounts"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
