"""Skew fails open (fields a newer CRD added are ignored), so it is made loud: the
FieldsIgnored condition says the fields are NOT applied, and a Warning Event is posted once
per change of what is ignored, for whoever alerts on Events. Where a newer field may
restrict something (`spec.ingress` of a model; `spec.tenants[]`, `spec.defaultTenant` of a
QuotaPolicy) an unknown field is refused instead: fail closed."""

from __future__ import annotations

import pytest
from kubeonnx_operator.policy import PolicyReconciler
from kubeonnx_operator.quota import read_policy
from kubeonnx_operator.spec import InvalidSpec, RouteRefused, read_spec
from kubeonnx_operator.status import FIELDS_IGNORED

from tests.operator.test_reconcile import (
    FakeKube,
    body,
    observed_with_owned_ingress,
    ready,
    reconciler,
)
from tests.operator.test_secrets import Clock, SecretsKube, policy, reason, reconcilers
from tests.operator.test_skew import MODELS, _model_body, future


async def test_ignored_fields_post_one_warning_per_change_and_say_not_applied() -> None:
    doc = next(p.values[0] for p in MODELS if "quotaPolicy" not in p.values[0]["spec"])
    newer, added = future(doc)
    kube = FakeKube()
    body = _model_body(newer)
    await reconciler(kube).reconcile(body)
    warnings = [e for e in kube.events if e[1] == FIELDS_IGNORED]
    assert len(warnings) == 1
    type_, _, message = warnings[0]
    assert type_ == "Warning"
    assert "NOT applied" in message and added[0] in message
    (cond,) = [c for c in body["status"]["conditions"] if c["type"] == FIELDS_IGNORED]
    assert "NOT applied" in cond["message"]

    await reconciler(kube).reconcile(body)  # nothing changed: no second Warning
    assert len([e for e in kube.events if e[1] == FIELDS_IGNORED]) == 1


INGRESS = {"enabled": True, "host": "shared.example", "path": "/models/ns/m"}


def test_an_unknown_field_under_spec_ingress_is_refused_not_ignored() -> None:
    spec = {"model": {"uri": "s3://b/m.onnx"}}
    read_spec({**spec, "ingress": INGRESS})  # known fields: read
    newer = {**spec, "ingress": {**INGRESS, "allowedSourceRanges": ["10.0.0.0/8"]}}
    with pytest.raises(RouteRefused) as refused:
        read_spec(newer)
    assert "spec.ingress.allowedSourceRanges" in str(refused.value)
    assert "upgrade the operator" in str(refused.value)
    # Elsewhere an unknown field is still ignored (and named).
    _, ignored = read_spec({**spec, "futureField": 1})
    assert ignored == ["spec.futureField"]


async def test_a_model_with_an_ingress_field_it_does_not_know_loses_its_ingress() -> None:
    kube = FakeKube()
    observed = observed_with_owned_ingress()
    ingress = {**INGRESS, "allowedSourceRanges": ["10.0.0.0/8"]}
    await reconciler(kube, observed).reconcile(body(ingress=ingress))
    assert kube.deleted == [("Ingress", "m", "ingress-uid")]  # not served more openly
    cond = ready(kube)
    assert cond["reason"] == "InvalidSpec"
    assert "spec.ingress.allowedSourceRanges" in cond["message"]


@pytest.mark.parametrize("where", ["tenants", "defaultTenant"])
def test_an_unknown_field_of_a_tenant_is_refused_not_ignored(where: str) -> None:
    raw = policy(1)["spec"]
    if where == "defaultTenant":
        raw["defaultTenant"] = {"limits": raw["tenants"][0]["limits"], "futureCap": 1}
        named = "spec.defaultTenant.futureCap"
    else:
        raw["tenants"][0]["futureCap"] = 1
        named = "spec.tenants[0].futureCap"
    with pytest.raises(InvalidSpec) as refused:
        read_policy(raw)
    assert named in str(refused.value)


async def test_a_policy_with_a_tenant_field_it_does_not_know_is_not_ready() -> None:
    kube = SecretsKube({"key-0"})
    qp = policy(1)
    qp["spec"]["tenants"][0]["futureCap"] = 1
    policies: PolicyReconciler = reconcilers(kube, qp, Clock())[1]
    await policies.reconcile(qp)
    got, message = reason(kube.policy_statuses[-1])
    assert got == "InvalidSpec" and "spec.tenants[0].futureCap" in message


async def test_a_policy_with_ignored_fields_posts_one_warning_per_change() -> None:
    kube = SecretsKube({"key-0"})
    qp = policy(1, futureField=1)
    policies: PolicyReconciler = reconcilers(kube, qp, Clock())[1]
    await policies.reconcile(qp)
    got, message = reason(kube.policy_statuses[-1])
    assert got == "Ready" and "NOT applied" in message and "spec.futureField" in message
    await policies.reconcile(qp)  # nothing changed: no second Warning
    qp["spec"]["otherFutureField"] = 2
    await policies.reconcile(qp)  # what is ignored changed: one more
    warnings = [e for e in kube.events if e[1] == FIELDS_IGNORED]
    assert [w[0] for w in warnings] == ["Warning", "Warning"]
    assert "spec.otherFutureField" in warnings[1][2]
