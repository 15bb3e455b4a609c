"""Skew fails open (fields a newer CRD added are ignored), so it is made loud: the
FieldsIgnored condition says the fields are NOT applied, and a Warning Event is posted once
per change of what is ignored, for whoever alerts on Events."""

from __future__ import annotations

from kubeonnx_operator.status import FIELDS_IGNORED

from tests.operator.test_reconcile import FakeKube, reconciler
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
