"""spec.model.version: its default and characters (the typed spec, the CRD and the runtime
agree), its place in the runtime's contract, in status and in `kubeonnx render`, and what a
change of version alone changes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render import Model, render_children
from kubeonnx_operator.spec import InvalidSpec, parse_spec
from kubeonnx_operator.status import Verdict, derive_status
from kubeonnx_runtime.settings import ServeSettings
from pydantic import ValidationError

from tests.operator.test_reconcile import FakeKube, body, reconciler
from tests.operator.test_render import render, spec

ROOT = Path(__file__).resolve().parents[2]
GOOD = ["1", "v2", "2024-06-01", "1.2.3", "rc_1", "A", "x" * 63]
BAD = ["", "a/b", "-1", "1-", ".", "..", "v 2", "v%2F", "é", "1?x=2", "x" * 64]
URI = {"uri": "s3://b/k.onnx"}


def model_schema(crd: Path) -> dict[str, Any]:
    doc = yaml.safe_load(crd.read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]["properties"]["model"]["properties"]["version"]  # type: ignore[no-any-return]


def env_of(children: dict[str, dict[str, Any]], kind: str = "Deployment") -> dict[str, str]:
    container = children[kind]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_version_defaults_to_1_and_the_crd_says_so() -> None:
    assert parse_spec({"model": URI}).model.version == "1"
    schema = model_schema(ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml")
    assert schema["default"] == "1"
    assert 'default "1"' in schema["description"]  # what `kubectl explain` shows


@pytest.mark.parametrize("version", GOOD + BAD)
def test_operator_crd_and_runtime_accept_the_same_versions(version: str) -> None:
    schema = model_schema(ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml")
    (rule,) = schema["x-kubernetes-validations"]
    cel_regex = re.fullmatch(r"self\.matches\('(.*)'\)", rule["rule"])
    assert cel_regex is not None
    by_crd = len(version) <= schema["maxLength"] and re.search(cel_regex[1], version) is not None
    assert by_crd == (version in GOOD)
    assert "spec.model.version" in rule["message"]
    try:
        parse_spec({"model": {**URI, "version": version}})
        by_operator = True
    except InvalidSpec as exc:
        assert "spec.model.version" in str(exc)
        by_operator = False
    assert by_operator == (version in GOOD)
    try:
        ServeSettings(model_uri="file:///m.onnx", model_version=version)
        by_runtime = True
    except ValidationError:
        by_runtime = False
    assert by_runtime == (version in GOOD)


def test_the_runtime_and_the_gateway_are_told_the_version() -> None:
    doc = spec(
        model={**URI, "version": "2024-06"},
        **{"async": {"enabled": True, "redis": {"url": "redis://r:6379"}}},
    )
    model = Model("m", "ns", parse_spec(doc["spec"]))
    deployments = [c for c in render_children(model, OperatorConfig()) if c["kind"] == "Deployment"]
    assert len(deployments) == 2  # the model's and its asynchronous gateway's
    for deployment in deployments:
        assert env_of({"Deployment": deployment})["KUBEONNX_MODEL_VERSION"] == "2024-06"
    assert env_of(render(spec(model=URI)))["KUBEONNX_MODEL_VERSION"] == "1"


def test_changing_only_the_version_changes_only_the_pods_environment() -> None:
    scaling = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 4}
    before = render(spec(model={**URI, "version": "1"}, scaling=scaling))
    after = render(spec(model={**URI, "version": "2"}, scaling=scaling))
    assert before.keys() == after.keys()
    for kind in before:
        # Each version's children say whose they are in their own metadata (not the pods').
        labels = [before[kind]["metadata"]["labels"], after[kind]["metadata"]["labels"]]
        if kind != "Service":
            assert [x.pop("kubeonnx.io/version") for x in labels] == ["1", "2"], kind
        if kind != "Deployment":
            # The Service, the autoscaler and KEDA's query are the same objects.
            assert before[kind] == after[kind], kind
    # The Deployment keeps its name and selector: a rolling update of the same pods.
    old, new = before["Deployment"], after["Deployment"]
    assert old["metadata"] == new["metadata"]
    assert old["spec"]["selector"] == new["spec"]["selector"]
    changed = {k for k in env_of(before) if env_of(before)[k] != env_of(after).get(k)}
    assert changed == {"KUBEONNX_MODEL_VERSION"}
    old_env = old["spec"]["template"]["spec"]["containers"][0].pop("env")
    new_env = new["spec"]["template"]["spec"]["containers"][0].pop("env")
    assert old == new and len(old_env) == len(new_env)


def test_kubeonnx_render_prints_the_version() -> None:
    doc = {"kind": "InferenceModel", **spec(model={**URI, "version": "7.1"})}
    out, problems = render_documents([("m.yaml", doc)], OperatorConfig())
    assert not problems
    deployment = next(c for c in out if c["kind"] == "Deployment")
    assert env_of({"Deployment": deployment})["KUBEONNX_MODEL_VERSION"] == "7.1"
    bad = {"kind": "InferenceModel", **spec(model={**URI, "version": "a/b"})}
    out, problems = render_documents([("m.yaml", bad)], OperatorConfig())
    assert not out and "spec.model.version" in problems[0]


async def test_status_shows_the_version_the_spec_serves() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    await rec.reconcile(body())
    assert kube.statuses[-1]["version"] == "1"
    changed = body(model={"uri": "s3://b/m.onnx", "version": "v2"})
    changed["status"] = kube.statuses[-1]
    await rec.reconcile(changed)
    assert kube.statuses[-1]["version"] == "v2"


def test_an_unreadable_spec_keeps_the_version_that_serves() -> None:
    status = derive_status(
        generation=3,
        previous={"version": "v2", "mode": "sync"},
        verdict=Verdict(False, "InvalidSpec", "spec.model.version ..."),
        deployment=None,
        url=None,
        external_url=None,
        now="t",
    )
    assert status["version"] == "v2"
