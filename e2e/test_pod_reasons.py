"""Reasons read from what the kubelet reports of a pod, simulated on kwok's pods: an image
that cannot be pulled, a container whose configuration cannot be made."""

from __future__ import annotations

import json

import pytest

from e2e.conftest import Cluster
from e2e.operator_process import OperatorProcess
from e2e.test_operator import model, ready, until_reason

pytestmark = pytest.mark.e2e


def report_waiting(cluster: Cluster, namespace: str, name: str, reason: str, message: str) -> None:
    """Make the model's pod report its container waiting for `reason`, as a kubelet would."""
    pods = cluster.get("pods", "-n", namespace, "-l", f"kubeonnx.io/inferencemodel={name}")
    assert pods and pods["items"]
    pod = pods["items"][0]["metadata"]["name"]
    waiting = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "ContainersReady", "status": "False"},
            ],
            "containerStatuses": [
                {
                    "name": "runtime",
                    "ready": False,
                    "restartCount": 0,
                    "image": "registry.example.com/kubeonnx-runtime:missing",
                    "imageID": "",
                    "state": {"waiting": {"reason": reason, "message": message}},
                }
            ],
        }
    }
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, "kwok.x-k8s.io/status=custom")
    cluster.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(waiting),
    )


@pytest.mark.parametrize(
    ("waiting", "message", "reason"),
    [
        (
            "ErrImagePull",
            'failed to pull image "registry.example.com/kubeonnx-runtime:missing": not found',
            "ImagePullFailed",
        ),
        (
            "ImagePullBackOff",
            'Back-off pulling image "registry.example.com/kubeonnx-runtime:missing"',
            "ImagePullFailed",
        ),
        (
            "CreateContainerConfigError",
            'secret "s3-credentials" not found',
            "InvalidSpec",
        ),
    ],
)
def test_the_kubelets_waiting_reason_is_the_models_reason(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    waiting: str,
    message: str,
    reason: str,
) -> None:
    if not cluster.local:
        pytest.skip("simulates the kubelet's report, which only kwok nodes allow")
    assert cluster.apply(model("pulled"), namespace).returncode == 0
    ready(cluster, namespace, "pulled")
    report_waiting(cluster, namespace, "pulled", waiting, message)
    cond = until_reason(cluster, namespace, "pulled", reason)
    assert cond["status"] == "False"
    assert cond["message"] == message
