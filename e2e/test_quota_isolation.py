"""The API server refuses what would merge tenants: a tenant named `default` (the name of
requests without a known key), and bounds the decision budget."""

from __future__ import annotations

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_quota import policy


def served(cluster: Cluster, namespace: str) -> None:
    """Wait until the API server's discovery serves the CRD (Established comes first)."""
    eventually(
        lambda: (
            cluster.kubectl("get", "quotapolicies", "-n", namespace, check=False).returncode == 0
        ),
        30,
        what="QuotaPolicy in discovery",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"tenants": [{"name": "default", "apiKeySecret": {"name": "k", "key": "token"}}]},
            'spec.tenants[].name "default" is reserved for requests without a known key',
        ),
        ({"decisionBudgetMs": 0}, "spec.decisionBudgetMs: Invalid value: 0"),
        ({"decisionBudgetMs": 60000}, "spec.decisionBudgetMs: Invalid value: 60000"),
    ],
)
def test_the_api_server_refuses_a_tenant_named_default_and_a_budget_out_of_bounds(
    cluster: Cluster,
    operator: OperatorProcess,  # installs the CRDs
    namespace: str,
    spec: dict,  # type: ignore[type-arg]
    message: str,
) -> None:
    served(cluster, namespace)
    bad = policy("merged")
    bad["spec"].update(spec)
    refused = cluster.apply(bad, namespace)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    assert cluster.get("quotapolicy", "merged", "-n", namespace) is None


def test_the_decision_budget_defaults_to_25_ms(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    served(cluster, namespace)
    assert cluster.apply(policy("budget"), namespace).returncode == 0
    stored = cluster.get("quotapolicy", "budget", "-n", namespace) or {}
    assert stored["spec"]["decisionBudgetMs"] == 25
