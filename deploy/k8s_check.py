"""What the Kubernetes schemas cannot say about deploy/k8s: the drain's timing, the probes, the parts.

    python k8s_check.py RENDERED_DEFAULT.yaml RENDERED_SINGLE_NODE.yaml

Run by deploy/validate.sh on ``kubectl kustomize`` output (with PyYAML from
its tools venv). Each assertion names a promise docs/deployment.md makes:

* stopping a pod never cuts a stream early: preStop's sleep plus
  ``SLUICE_DRAIN_TIMEOUT`` (plus margin) fits inside
  ``terminationGracePeriodSeconds``, and liveness tolerates the drain's 503s;
* readiness and liveness ask ``/health``; the config comes from the generated
  ConfigMap; provider keys from the Secret; Prometheus finds each pod;
* ``SluiceStreamsNearLimit``'s constant is the pods' stream limit
  (``max_streams`` of the ConfigMap's file x ``SLUICE_WORKERS``);
* the default has every part (Service, PDB, HPA, Redis); the single-node
  trial has one replica and no PDB (it would block draining the one node).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parent / "prometheus" / "alerts.yml"


def objects(path: str) -> dict[tuple[str, str], dict]:
    with open(path) as file:
        return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(file) if o}


def main(default_path: str, single_node_path: str) -> None:
    full, trial = objects(default_path), objects(single_node_path)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet", "ConfigMap"):
        assert any(k == kind for k, _ in full), f"default: no {kind}"
    assert not any(k in ("PodDisruptionBudget", "HorizontalPodAutoscaler") for k, _ in trial), "single-node keeps a PDB or HPA"
    assert trial["Deployment", "sluice"]["spec"]["replicas"] == 1, "single-node: not one replica"

    deployment = full["Deployment", "sluice"]
    assert "replicas" not in deployment["spec"], "the HPA owns replicas: a replicas field resets them on every apply"
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [gateway] = [c for c in spec["containers"] if c["name"] == "gateway"]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    drain = float(env["SLUICE_DRAIN_TIMEOUT"])
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", f"preStop is not a sleep: {pre_stop}"
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + drain + 10, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop[1]} + SLUICE_DRAIN_TIMEOUT {drain} + 10 s margin"
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["path"] == "/health", f"{probe} does not ask /health"
    live = gateway["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain, "liveness would restart a draining gateway"
    assert gateway["command"][-2:] == ["--config", "/etc/sluice/sluice.toml"], gateway["command"]
    assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["limits"]["memory"], "no resources"
    assert any(s.get("secretRef", {}).get("name") == "sluice-provider-keys" for s in gateway["envFrom"]), "no key Secret"
    assert spec["affinity"]["podAntiAffinity"], "no pod anti-affinity"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    [config_volume] = [v for v in spec["volumes"] if "configMap" in v]
    assert ("ConfigMap", config_volume["configMap"]["name"]) in full, "the mounted ConfigMap is not the generated one"
    assert env["SLUICE_REDIS_URL"].startswith("redis://sluice-redis:") and ("Service", "sluice-redis") in full

    # The streams alert compares with the limit the gateway exports, not a constant to keep in step.
    assert "sluice_max_streams" in ALERTS.read_text(), "SluiceStreamsNearLimit no longer reads sluice_max_streams"

if __name__ == "__main__":
    main(*sys.argv[1:])
