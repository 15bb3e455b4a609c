"""The typed spec refuses what the CRD refuses, with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render.model import load_model
from kubeonnx_operator.spec import InvalidSpec, parse_spec

URI = {"uri": "s3://b/k.onnx"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"model": URI, "scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
        ),
        ({"model": URI, "scaling": {"minReplicas": 0}}, "needs autoscaler keda"),
        # Nothing would wake it: at zero replicas no runtime exports the in-flight gauge.
        (
            {"model": URI, "scaling": {"minReplicas": 0, "autoscaler": "keda"}},
            "a demand signal that exists while no replica runs: spec.scaling.holdRequests",
        ),
        (
            {"model": URI, "scaling": {"holdRequests": True}},
            "spec.scaling.holdRequests needs autoscaler keda",
        ),
        (
            {
                "model": URI,
                "traffic": {
                    "candidates": [
                        {
                            "version": "2",
                            "model": URI,
                            "scaling": {"autoscaler": "keda", "holdRequests": True},
                        }
                    ]
                },
            },
            "scaling.holdRequests is not taken: set spec.scaling.holdRequests",
        ),
        (
            {"model": URI, "async": {"enabled": True}},
            "spec.async.redis.url is required when spec.async.enabled is true",
        ),
        (
            {"model": URI, "async": {"enabled": True, "redis": {"url": "redis://u:pw@r:6379"}}},
            "spec.async.redis.url",
        ),
        ({"model": URI, "async": {"resultTTL": "1 day"}}, "spec.async.resultTTL"),
        (
            {"model": URI, "processing": {"input": {"image": {"size": [224]}}}},
            "spec.processing.input.image.size",
        ),
        (
            {"model": URI, "processing": {"input": {"image": {"size": [8, 8], "std": [1, 0, 1]}}}},
            "spec.processing.input.image.std must not contain 0",
        ),
        (
            {
                "model": URI,
                "processing": {
                    "input": {"image": {"size": [8, 8]}},
                    "output": {"classification": {}, "detection": {}},
                },
            },
            "spec.processing.output takes classification or detection, not both",
        ),
        (
            {"model": URI, "pod": {"volumes": [{"name": "labels", "emptyDir": {}}]}},
            "spec.pod.volumes 'labels': the name is the runtime's own",
        ),
        (
            {"model": URI, "pod": {"env": [{"name": "KUBEONNX_MODEL_URI", "value": "x"}]}},
            "spec.pod.env 'KUBEONNX_MODEL_URI'",
        ),
        (
            {"model": URI, "pod": {"volumes": [{"name": "tmp", "emptyDir": {}}]}},
            "spec.pod.volumes 'tmp': the name is the runtime's own",
        ),
        (
            {"model": URI, "pod": {"volumeMounts": [{"name": "x", "mountPath": "/x"}]}},
            "spec.pod.volumeMounts 'x': no volume of that name",
        ),
        ({"model": URI, "scaling": {"autoscaler": "magic"}}, "spec.scaling.autoscaler"),
        ({"model": {"uri": "http://x/m.onnx"}}, "spec.model.uri 'http://x/m.onnx' must start"),
        ({"model": {**URI, "sha256": "abc"}}, "spec.model.sha256"),
        ({"model": URI, "accelerator": {"count": -1}}, "spec.accelerator.count"),
        ({"model": URI, "accelerator": {"count": 1}}, "spec.accelerator.profile is required"),
        ({"model": URI, "runtime": {"maxBatchSize": 0}}, "spec.runtime.maxBatchSize"),
        ({"model": URI, "ingress": {"enabled": True}}, "spec.ingress.host is required"),
        ({}, "spec.model"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(
        InvalidSpec,
        match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)").replace("'", "."),
    ):
        parse_spec(spec)


def test_unknown_profile_is_refused_against_the_operator_config() -> None:
    spec = {"model": URI, "accelerator": {"count": 1, "profile": "tpu"}}
    with pytest.raises(InvalidSpec, match="'tpu' is not a profile of this operator; known: h100"):
        load_model("m", "ns", spec, OperatorConfig())


def test_defaults_match_the_crd() -> None:
    spec = parse_spec({"model": URI})
    assert spec.runtime.max_batch_size == 1 and spec.runtime.max_queue == 256
    assert spec.scaling.autoscaler == "hpa" and spec.scaling.min_replicas == 1
    assert spec.scaling.target_cpu_utilization == 70


@pytest.mark.parametrize("name", ["a" * 64, "1model", "Model", "m_1"])
def test_names_the_children_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(InvalidSpec, match="must be at most 63 characters of a-z, 0-9 and '-'"):
        load_model(name, "ns", {"model": URI}, OperatorConfig())


def test_only_prefixed_environment_variables_configure_the_operator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from kubeonnx_operator.config import load_config

    monkeypatch.setenv("NAMESPACES", '["stray"]')
    monkeypatch.setenv("RESYNC_SECONDS", "1")
    monkeypatch.setenv("resyncSeconds", "2")
    config = load_config()
    assert config.namespaces == [] and config.resync_seconds == 60.0
    monkeypatch.setenv("KUBEONNX_OPERATOR_NAMESPACES", '["ml"]')
    path = tmp_path / "config.yaml"
    path.write_text("resyncSeconds: 7\nprofiles: {a: {resourceName: x.com/gpu}}\n")
    config = load_config(path)
    assert config.namespaces == ["ml"] and config.resync_seconds == 7
    assert config.profiles["a"].resource_name == "x.com/gpu"
