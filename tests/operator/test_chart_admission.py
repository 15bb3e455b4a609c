"""The route admission policy is cluster-scoped: `routeAdmissionPolicy.enabled` renders it
(default) or not, so that an installer with namespaced rights alone can install the chart
with `watchNamespaces`, and then the chart holds nothing cluster-wide at all."""

from __future__ import annotations

from tests.operator.test_chart_values import rendered, template

POLICY_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
CLUSTER_SCOPED = POLICY_KINDS | {"ClusterRole", "ClusterRoleBinding"}


def test_the_route_policy_is_rendered_by_default() -> None:
    kinds = {d["kind"] for d in rendered()}
    assert kinds >= POLICY_KINDS


def test_namespaced_without_the_route_policy_renders_nothing_cluster_wide() -> None:
    docs = rendered("watchNamespaces={ml}", "routeAdmissionPolicy.enabled=false")
    assert {d["kind"] for d in docs} & CLUSTER_SCOPED == set()
    assert "Role" in {d["kind"] for d in docs}  # the namespaced RBAC is still there


def test_the_schema_refuses_a_value_that_is_not_a_boolean() -> None:
    proc = template("routeAdmissionPolicy.enabled=maybe")
    assert proc.returncode != 0 and "routeAdmissionPolicy" in proc.stderr
