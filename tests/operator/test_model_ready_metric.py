"""kubeonnx_operator_model_ready: one series per model, as its Ready condition says, gone
with the model (what the "model not Ready" alert reads)."""

from __future__ import annotations

from kubeonnx_operator.observed import ObservedChildren
from prometheus_client import REGISTRY

from tests.operator.test_reconcile import KEY, FakeKube, body, reconciler, seen_deployment


def series() -> dict[str, float]:
    """The gauge's samples of model ns/m, by reason."""
    return {
        s.labels["reason"]: s.value
        for family in REGISTRY.collect()
        if family.name == "kubeonnx_operator_model_ready"
        for s in family.samples
        if (s.labels["namespace"], s.labels["model"]) == KEY
    }


async def test_the_gauge_follows_the_ready_condition_and_leaves_with_the_model() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    b = body()
    await rec.reconcile(b)
    assert series() == {"Progressing": 0}
    # The Deployment rolls out: Ready, and the Progressing series is gone (one per model).
    generation = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(generation, 1, owns_replicas=False), deleted=False)
    await rec.reconcile(body())
    assert kube.statuses[-1]["conditions"][0]["reason"] == "Ready"
    assert series() == {"Ready": 1}
    # A spec the operator refuses: not Ready, with its reason.
    await rec.reconcile(body(scaling={"minReplicas": 5, "maxReplicas": 2}))
    assert series() == {"InvalidSpec": 0}
    rec.forget(KEY)
    assert series() == {}
