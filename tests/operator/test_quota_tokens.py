"""The quota unit tokens in the operator: a QuotaPolicy's `tokens` reaches the runtime's file
(which the runtime reads), its Ready message says how tokens are counted, and a limit of
tokens without `tokens` makes the policy InvalidSpec and its models QuotaPolicyInvalid, and
a model without the token input shows ModelLoadFailed with the runtime's line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.status import derive_verdict
from kubeonnx_runtime.quota import QuotaConfig

from tests.operator.test_secrets import Clock, SecretsKube, metered, policy, reason, reconcilers
from tests.operator.test_status import deployment, pod, runtime

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"unit": "tokens", "limit": 1000, "window": "1m"}


def test_the_token_budget_examples_file_is_the_one_the_runtime_reads() -> None:
    example = ROOT / "examples" / "token-budget.yaml"
    docs = [(example.name, d) for d in yaml.safe_load_all(example.read_text()) if d]
    rendered, problems = render_documents(docs, OperatorConfig())
    assert not problems
    (config_map,) = [c for c in rendered if c["kind"] == "ConfigMap"]
    config = QuotaConfig.model_validate(json.loads(config_map["data"]["config.json"]))
    assert config.tokens is not None
    assert (config.tokens.input, config.tokens.count) == ("attention_mask", "nonzero")
    assert {lim.unit for t in config.tenants for lim in t.limits} == {"tokens", "requests"}


def token_policy(**spec: Any) -> dict[str, Any]:
    qp = policy(1, **spec)
    qp["spec"]["tenants"][0]["limits"].append(TOKENS)
    return qp


async def test_the_policy_says_how_tokens_are_counted() -> None:
    kube = SecretsKube({"key-0"})
    qp = token_policy(tokens={"input": "input_ids", "count": "elements"})
    _, policies = reconcilers(kube, qp, Clock())
    await policies.reconcile(qp)
    got, message = reason(kube.policy_statuses[-1])
    assert got == "Ready" and "tokens: the elements of input input_ids" in message, message


async def test_a_limit_of_tokens_without_tokens_is_invalid_naming_both() -> None:
    kube = SecretsKube({"key-0"})
    qp = token_policy()
    models, policies = reconcilers(kube, qp, Clock())
    await policies.reconcile(qp)
    got, message = reason(kube.policy_statuses[-1])
    assert got == "InvalidSpec", message
    assert "spec.tenants[t0].limits: a limit of unit tokens needs spec.tokens" in message
    await models.reconcile(metered("a"))
    got, message = reason(kube.statuses[-1])
    assert got == "QuotaPolicyInvalid" and "needs spec.tokens" in message, message
    assert kube.applied == []


def test_a_model_without_the_token_input_shows_model_load_failed_with_the_runtimes_line() -> None:
    """The runtime's own refusal (its termination message) as the kubelet reports a
    container that keeps failing: the model's reason and message."""
    from kubeonnx_runtime.datatypes import TensorSpec
    from kubeonnx_runtime.errors import FatalStartupError
    from kubeonnx_runtime.tokens import check_token_input

    config = QuotaConfig.model_validate(
        {
            "policy": "team",
            "namespace": "ns",
            "tokens": {"input": "attention_mask", "count": "nonzero"},
            "defaultTenant": {"limits": [TOKENS]},
        }
    )
    try:
        check_token_input(config, [TensorSpec("input", "FP32", (-1, 4))])
    except FatalStartupError as exc:
        line = str(exc)
    else:
        raise AssertionError("the runtime took a model without the token input")
    terminated = {"exitCode": 1, "reason": "Error", "message": line + "\n"}
    p = pod(
        containerStatuses=[
            runtime(
                restartCount=3,
                state={"waiting": {"reason": "CrashLoopBackOff"}},
                lastState={"terminated": terminated},
            )
        ]
    )
    verdict = derive_verdict(deployment(ready=0), [p], min_replicas=1)
    assert verdict.reason == "ModelLoadFailed"
    assert verdict.message == (
        "quota policy 'team' counts tokens in input 'attention_mask', which the model does "
        "not have (its inputs: input)"
    )
