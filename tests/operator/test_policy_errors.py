"""A QuotaPolicy whose check fails (the API refuses or does not answer) says so in its status:
Ready=False, reason ReconcileError, at the new generation; never a stale Ready=True."""

from __future__ import annotations

from typing import Any

import pytest
from kubeonnx_operator.presence import PRESENT_RECHECK_S

from tests.operator.test_secrets import Clock, SecretsKube, policy, reason, reconcilers


class Failing(SecretsKube):
    """The Secret check fails once `fail` is set: an answer that is no Secret, as a proxy or
    a broken API server may send."""

    fail = False

    async def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.fail:
            raise ValueError(f"Secret {namespace}/{name}: the API server sent Secret")
        return await super().secret_metadata(namespace, name)


async def test_a_failed_check_shows_reconcile_error_at_the_new_generation() -> None:
    kube = Failing({"key-0"})
    qp = policy(1)
    clock = Clock()
    _, policies = reconcilers(kube, qp, clock)
    await policies.reconcile(qp)
    assert reason(kube.policy_statuses[-1])[0] == "Ready"

    kube.fail = True
    clock.now += PRESENT_RECHECK_S + 1
    qp["metadata"]["generation"] = 2
    qp["spec"]["tenants"][0]["limits"][0]["limit"] = 5
    with pytest.raises(ValueError):  # raised again: the queue retries with backoff
        await policies.reconcile(qp)
    status = kube.policy_statuses[-1]
    (cond,) = status["conditions"]
    assert (cond["status"], cond["reason"]) == ("False", "ReconcileError")
    assert "the API server sent Secret" in cond["message"]
    assert status["observedGeneration"] == cond["observedGeneration"] == 2
    assert qp["status"] is status

    kube.fail = False  # the next try succeeds and says so
    await policies.reconcile(qp)
    assert reason(kube.policy_statuses[-1])[0] == "Ready"
