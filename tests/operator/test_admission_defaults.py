"""Admission that teaches: every default of the typed spec is in the CRD (its `default:`
equal to the operator's, and said in the description, which is what `kubectl explain`
shows), maxReplicas follows minReplicas, and
what would silently do something else is refused naming the field."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.spec import InferenceModelSpec, InvalidSpec, parse_spec
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tests.operator.test_reconcile import FakeKube, body, ready, reconciler

ROOT = Path(__file__).resolve().parents[2]
URI = {"uri": "s3://b/k.onnx"}


def crd_spec_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / name).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]  # type: ignore[no-any-return]


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also through `X | None`), if any."""
    candidates = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else (annotation,)
    )
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def undocumented_defaults(model: type[BaseModel], schema: dict[str, Any], path: str) -> list[str]:
    """Fields of `model` whose default the CRD `schema` neither sets nor describes, or sets
    to another value."""
    problems = []
    properties = schema.get("properties") or {}
    for name, field in model.model_fields.items():
        wire = field.alias or name
        where = f"{path}.{wire}"
        prop = properties.get(wire)
        if prop is None:
            problems.append(f"{where}: not in the CRD")
            continue
        inner = nested_model(field.annotation)
        if inner is not None:
            problems += undocumented_defaults(inner, prop, where)
            continue
        default = field.default
        if default is PydanticUndefined or default is None or default in ({}, [], ""):
            continue
        if "default" in prop and prop["default"] != pytest.approx(default):
            problems.append(f"{where}: CRD default {prop['default']!r}, operator {default!r}")
        # `kubectl explain` shows the description, not the schema's default: it must say it.
        if "default" not in (prop.get("description") or "").lower():
            problems.append(f"{where}: the description does not say the default {default!r}")
    return problems


def test_every_default_of_the_typed_spec_is_in_the_crd() -> None:
    schema = crd_spec_schema("inferencemodels.kubeonnx.io.yaml")
    assert undocumented_defaults(InferenceModelSpec, schema, "spec") == []


def test_the_comparison_sees_a_missing_default() -> None:
    schema = crd_spec_schema("inferencemodels.kubeonnx.io.yaml")
    queue = schema["properties"]["runtime"]["properties"]["maxQueue"]
    queue["description"] = "Requests queued per replica."
    queue["default"] = 128
    assert undocumented_defaults(InferenceModelSpec, schema, "spec") == [
        "spec.runtime.maxQueue: CRD default 128, operator 256",
        "spec.runtime.maxQueue: the description does not say the default 256",
    ]


@pytest.mark.parametrize(
    ("scaling", "low", "high"),
    [
        ({"minReplicas": 3}, 3, 3),
        ({}, 1, 1),
        ({"minReplicas": 2, "maxReplicas": 5}, 2, 5),
        ({"minReplicas": 0, "autoscaler": "keda", "demand": {"prometheusQuery": "up"}}, 0, 1),
    ],
)
def test_max_replicas_follows_min_replicas_when_left_out(
    scaling: dict[str, Any], low: int, high: int
) -> None:
    spec = parse_spec({"model": URI, "scaling": scaling})
    assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (low, high)


def test_the_crd_has_no_max_replicas_default_to_contradict_min_replicas() -> None:
    scaling = crd_spec_schema("inferencemodels.kubeonnx.io.yaml")["properties"]["scaling"]
    assert "maxReplicas" not in scaling["default"]
    assert "default" not in scaling["properties"]["maxReplicas"]
    rule = scaling["x-kubernetes-validations"][0]["rule"]
    assert "!has(self.maxReplicas)" in rule


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"model": URI, "scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
        ),
        (
            {"model": URI, "accelerator": {"profile": "h100"}},
            "spec.accelerator.count (GPUs per replica) is required when "
            "spec.accelerator.profile is set",
        ),
        ({"model": {"uri": "s3://bucket"}}, "must be s3://BUCKET/KEY naming the model file"),
        ({"model": {"uri": "s3://bucket/"}}, "must be s3://BUCKET/KEY naming the model file"),
        ({"model": {"uri": "s3://bucket/dir/"}}, "must be s3://BUCKET/KEY naming the model file"),
    ],
)
def test_what_would_silently_do_something_else_is_refused(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


def test_a_key_in_a_folder_is_a_model_file() -> None:
    assert parse_spec({"model": {"uri": "s3://bucket/dir/model.onnx"}}).model.uri.endswith("onnx")


def test_kubectl_get_qp_shows_the_reason() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "quotapolicies.kubeonnx.io.yaml").read_text())
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert "priority" not in columns["Reason"]


class RefKube(FakeKube):
    """FakeKube whose Secrets and ConfigMaps exist only when listed in `present`; it counts
    the lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.present: set[tuple[str, str]] = set()
        self.lookups: list[tuple[str, str]] = []

    async def metadata(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.lookups.append((kind, name))
        return {"kind": "PartialObjectMetadata"} if (kind, name) in self.present else None


LABELLED = {
    "input": {"image": {"size": [8, 8]}},
    "output": {"detection": {"labelsConfigMap": {"name": "coco", "key": "labels.txt"}}},
}


@pytest.mark.parametrize(
    ("spec", "kind", "name", "reason", "field"),
    [
        (
            {"model": {"uri": "s3://b/m.onnx", "s3": {"credentialsSecret": "s3-creds"}}},
            "Secret",
            "s3-creds",
            "CredentialsSecretNotFound",
            "spec.model.s3.credentialsSecret",
        ),
        (
            {"processing": LABELLED},
            "ConfigMap",
            "coco",
            "LabelsConfigMapNotFound",
            "spec.processing.output.detection.labelsConfigMap",
        ),
    ],
)
async def test_a_missing_secret_or_config_map_is_named_before_any_pod_needs_it(
    spec: dict[str, Any], kind: str, name: str, reason: str, field: str
) -> None:
    kube = RefKube()
    reconcile = reconciler(kube)
    await reconcile.reconcile(body(**spec))
    assert ready(kube)["reason"] == reason
    assert field in ready(kube)["message"] and repr(name) in ready(kube)["message"]
    assert kube.applied == []  # nothing applied until it exists
    kube.present.add((kind, name))
    reconcile.secrets.recheck_missing("ns")  # as a change in the namespace would
    await reconcile.reconcile(body(**spec))
    assert ready(kube)["reason"] != reason
    assert any(m["kind"] == "Deployment" for _, m in kube.applied)
    looked = len(kube.lookups)
    await reconcile.reconcile(body(**spec))  # an idle resync: found once, not asked again
    assert len(kube.lookups) == looked


def test_kubectl_get_im_shows_the_readmes_columns() -> None:
    """README's `kubectl get im` sample is the CRD's printer columns; `-o wide` adds MESSAGE."""
    readme = (ROOT / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("# NAME "))
    crd = yaml.safe_load((ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml").read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    default = ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]
    assert header.split()[1:] == default
    wide = [c for c in columns if c.get("priority")]
    assert [(c["name"], c["priority"]) for c in wide] == [("Message", 1)]
    by_name = {c["name"]: c["jsonPath"] for c in columns}
    assert by_name["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert by_name["Reason"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert by_name["Message"] == '.status.conditions[?(@.type=="Ready")].message'
    assert by_name["Mode"] == ".status.mode" and by_name["URL"] == ".status.url"


IMAGE = {"input": {"image": {"size": [32, 32]}}, "output": {"classification": {"topK": 1}}}
QUEUE = {"enabled": True, "redis": {"url": "redis://r:6379/0"}}


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ({}, "sync"),
        ({"async": QUEUE}, "async"),
        ({"processing": IMAGE}, "image"),
        ({"async": QUEUE, "processing": IMAGE}, "async,image"),
    ],
)
async def test_mode_names_the_extra_ways_the_model_is_served(
    extra: dict[str, Any], mode: str
) -> None:
    assert parse_spec({"model": URI, **extra}).mode == mode
    kube = FakeKube()
    await reconciler(kube).reconcile(body(**extra))
    assert kube.statuses[-1]["mode"] == mode  # what MODE shows
