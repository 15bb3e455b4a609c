"""Status derivation from observed Deployments and pods."""

from __future__ import annotations

from typing import Any

from kubeonnx_operator.status import derive_status, derive_verdict, set_condition


def deployment(
    desired: int = 1,
    ready: int = 1,
    updated: int | None = None,
    total: int | None = None,
    generation: int = 2,
    observed: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": observed,
            "readyReplicas": ready,
            "updatedReplicas": desired if updated is None else updated,
            "replicas": desired if total is None else total,
            "conditions": conditions or [],
        },
    }


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}, "status": status}


def runtime(**fields: Any) -> dict[str, Any]:
    return {"name": "runtime", **fields}


def test_ready_when_rolled_out_and_ready() -> None:
    v = derive_verdict(deployment(desired=2, ready=2), [], min_replicas=2)
    assert (v.ready, v.reason) == (True, "Ready")


def test_not_ready_before_the_autoscaler_raises_the_deployment_to_min_replicas() -> None:
    """minReplicas 3 under an HPA: the Deployment first asks for 1 replica (the HPA raises
    it), and one ready pod must not make the model Ready (`kubectl wait` would return)."""
    early = deployment(desired=1, ready=1)
    v = derive_verdict(early, [], min_replicas=3)
    assert (v.ready, v.reason) == (False, "Progressing")
    assert v.message.startswith("1/3 replicas ready") and "minReplicas 3" in v.message
    status = derive_status(
        generation=2,
        previous={},
        verdict=v,
        deployment=early,
        url="u",
        external_url=None,
        now="t0",
        min_replicas=3,
    )
    assert status["replicaSummary"] == "1/3"
    assert not derive_verdict(deployment(desired=3, ready=2), [], min_replicas=3).ready
    v = derive_verdict(deployment(desired=3, ready=3), [], min_replicas=3)
    assert (v.ready, v.reason, v.message) == (True, "Ready", "3/3 replicas ready")
    # scaled up past minReplicas by the autoscaler: Ready while the new pods start
    v = derive_verdict(deployment(desired=5, ready=3), [], min_replicas=3)
    assert (v.ready, v.reason, v.message) == (True, "Ready", "3/5 replicas ready")


def test_old_pods_still_present_is_progressing() -> None:
    v = derive_verdict(deployment(desired=2, ready=2, updated=1, total=3), [], min_replicas=1)
    assert (v.ready, v.reason) == (False, "Progressing")
    assert v.message == "2/2 replicas ready, 1/2 updated"  # MESSAGE counts them


def test_a_rollout_past_its_deadline_carries_the_deployments_message() -> None:
    msg = 'ReplicaSet "m-5d8f" has timed out progressing.'
    late = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": msg,
    }
    d = deployment(desired=2, ready=1, updated=1, total=2, conditions=[late])
    v = derive_verdict(d, [], min_replicas=2)
    assert (v.ready, v.reason, v.message) == (False, "ProgressDeadlineExceeded", msg)


def test_deployment_not_yet_observed_is_progressing() -> None:
    v = derive_verdict(deployment(generation=3, observed=2), [], min_replicas=1)
    assert not v.ready and v.reason == "Progressing"


def test_unschedulable_carries_the_schedulers_message() -> None:
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    p = pod(
        phase="Pending",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}
        ],
    )
    v = derive_verdict(deployment(ready=0), [p], min_replicas=1)
    assert (v.ready, v.reason, v.message) == (False, "Unschedulable", msg)


def test_model_load_failure_carries_the_termination_message() -> None:
    p = pod(
        containerStatuses=[
            runtime(
                restartCount=3,
                state={"waiting": {"reason": "CrashLoopBackOff"}},
                lastState={
                    "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "message": "checksum mismatch for s3://b/k\n",
                    }
                },
            )
        ]
    )
    v = derive_verdict(deployment(ready=0), [p], min_replicas=1)
    assert (v.reason, v.message) == ("ModelLoadFailed", "checksum mismatch for s3://b/k")


def test_crash_without_message_is_crashloop() -> None:
    p = pod(
        containerStatuses=[
            runtime(
                restartCount=5,
                state={"waiting": {"reason": "CrashLoopBackOff"}},
                lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            )
        ]
    )
    v = derive_verdict(deployment(ready=0), [p], min_replicas=1)
    assert v.reason == "CrashLoop" and "OOMKilled" in v.message and "5 times" in v.message


def test_replica_failure_names_why_pods_cannot_be_created() -> None:
    d = deployment(
        ready=0,
        updated=0,
        total=0,
        conditions=[
            {
                "type": "ReplicaFailure",
                "status": "True",
                "message": 'serviceaccount "reader" not found',
            }
        ],
    )
    v = derive_verdict(d, [], min_replicas=1)
    assert v.reason == "ReplicaFailure" and "reader" in v.message


def test_scaled_to_zero_is_ready() -> None:
    v = derive_verdict(deployment(desired=0, ready=0), [], min_replicas=0)
    assert (v.ready, v.reason) == (True, "ScaledToZero")


def test_transition_time_kept_unless_status_flips() -> None:
    old = [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Progressing",
            "message": "",
            "lastTransitionTime": "t0",
        }
    ]
    same = set_condition(
        old, {"type": "Ready", "status": "False", "reason": "Unschedulable", "message": "x"}, "t1"
    )
    assert same[0]["lastTransitionTime"] == "t0" and same[0]["reason"] == "Unschedulable"
    flipped = set_condition(
        old, {"type": "Ready", "status": "True", "reason": "Ready", "message": ""}, "t2"
    )
    assert flipped[0]["lastTransitionTime"] == "t2"


def test_status_is_stable_when_nothing_changed() -> None:
    v = derive_verdict(deployment(), [], min_replicas=1)
    first = derive_status(
        generation=2,
        previous={},
        verdict=v,
        deployment=deployment(),
        url="u",
        external_url=None,
        now="t0",
    )
    again = derive_status(
        generation=2,
        previous=first,
        verdict=v,
        deployment=deployment(),
        url="u",
        external_url=None,
        now="t9",
    )
    assert first == again
    assert first["replicaSummary"] == "1/1" and first["observedGeneration"] == 2


def test_the_async_gateway_without_a_ready_replica_names_why() -> None:
    from kubeonnx_operator.status import gateway_verdict

    assert gateway_verdict(deployment(desired=2, ready=1), "m-gateway") is None
    missing = gateway_verdict(None, "m-gateway")
    assert missing is not None and missing.reason == "Progressing"
    rolling = gateway_verdict(deployment(ready=0), "m-gateway")
    assert rolling is not None and rolling.reason == "Progressing"
    quota = {"type": "ReplicaFailure", "status": "True", "message": "exceeded quota: pods"}
    failing = gateway_verdict(deployment(ready=0, conditions=[quota]), "m-gateway")
    assert failing is not None and not failing.ready
    assert failing.reason == "GatewayNotReady" and "exceeded quota: pods" in failing.message
    late = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    stuck = gateway_verdict(deployment(ready=0, conditions=[late]), "m-gateway")
    assert stuck is not None and stuck.reason == "GatewayNotReady"
