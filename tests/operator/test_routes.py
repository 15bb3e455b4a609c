"""Routes on a shared host: a model's Ingress path stays in its own namespace's part of the
shared pattern (/models/NAMESPACE/...) and holds no character an ingress controller reads
specially. The same rules reach the API server in e2e/test_cel.py."""

from __future__ import annotations

from typing import Any

import pytest
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render.model import load_model
from kubeonnx_operator.spec import InvalidSpec

from tests.operator.test_reconcile import (
    FakeKube,
    body,
    observed_with_owned_ingress,
    ready,
    reconciler,
)

# Each is a way past a prefix match or into a controller's configuration: nginx reads
# ';', '{}', '$' and whitespace in a location; a regex-mode controller reads the
# metacharacters; '..', '//', '%' and '.' change what the path means after normalising.
BAD_CHARACTERS = [
    "/models/ns/m;",
    "/models/ns/m{}",
    "/models/ns/$host",
    "/models/ns/m x",
    "/models/ns/m\tx",
    "/models/ns/m\n",
    "/models/ns/m/../../other/m",
    "/models/ns/m/./x",
    "/models/ns//m",
    "/models/ns/m%2F..",
    "/models/ns/m.*",
    "/models/ns/(m)",
    "/models/ns/m[0]",
    "/models/ns/m|x",
    "/models/ns/m?x",
    "/models/ns/m+",
    "/models/ns/^m",
    "/models/ns/m\\x",
    "/models/ns/m~",
    "/models/ns/m'",
    '/models/ns/m"',
    "/models/ns/m#x",
    "/models/ns/é",
    "models/ns/m",
    "",
    "/" + "a" * 256,
]
# Another namespace's prefix, the pattern's root (which would take every namespace's
# unmatched paths), and the same in other cases (a regex-mode controller ignores case).
HIJACKS = [
    "/models/other/m",
    "/models/other",
    "/models/other/",
    "/models",
    "/models/",
    "/MODELS/other/m",
    "/Models/ns/m",
    "/models/ns-b/m",  # a prefix of the name is not the namespace
    "/models/n/s/m",
]
GOOD = ["/", "/models/ns", "/models/ns/", "/models/ns/m", "/models/ns/m/v2", "/api/m", "/a_b-C9/"]


def load(path: str) -> Any:
    spec = {
        "model": {"uri": "s3://b/m.onnx"},
        "ingress": {"enabled": True, "host": "h", "path": path},
    }
    return load_model("m", "ns", spec, OperatorConfig(), from_cluster=True)


@pytest.mark.parametrize("path", BAD_CHARACTERS)
def test_characters_a_controller_reads_specially_are_refused(path: str) -> None:
    with pytest.raises(InvalidSpec, match=r"^spec\.ingress\.path must be '/' or segments"):
        load(path)


@pytest.mark.parametrize("path", HIJACKS)
def test_another_namespaces_prefix_is_refused(path: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        load(path)
    assert str(refused.value).startswith(f"spec.ingress.path {path!r}: paths under /models/")
    assert "namespace ns may use /models/ns or /models/ns/... only" in str(refused.value)


@pytest.mark.parametrize("path", GOOD)
def test_the_models_own_paths_are_served(path: str) -> None:
    assert load(path).route_path == (path.rstrip("/") or "/")


def test_render_refuses_them_too() -> None:
    from kubeonnx_operator.cli import render_documents

    doc = {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "model": {"uri": "s3://b/m.onnx"},
            "ingress": {"enabled": True, "host": "h", "path": "/models/other/m"},
        },
    }
    out, problems = render_documents([("f.yaml", doc)], OperatorConfig())
    assert not out and "spec.ingress.path '/models/other/m'" in problems[0]


async def test_a_hijacking_model_gets_no_ingress_and_loses_the_one_it_had() -> None:
    kube = FakeKube()
    # Made by an operator that did not check routes yet.
    observed = observed_with_owned_ingress()
    ingress = {"enabled": True, "host": "shared.example", "path": "/models/victim/their-model"}
    await reconciler(kube, observed).reconcile(body(ingress=ingress))
    assert not kube.applied
    assert kube.deleted == [("Ingress", "m", "ingress-uid")]
    cond = ready(kube)
    assert cond["reason"] == "InvalidSpec"
    assert cond["message"].startswith("spec.ingress.path '/models/victim/their-model'")
