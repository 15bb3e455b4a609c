"""Every failure of a reconcile's writes ends in a reason on the object: an answer with no
Status body (the text/plain 404 of an API group that is not installed) is an API error like
the others, and a failure that is no API error at all is a ReconcileError."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.kube import Kube, as_api_error, is_not_found
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.reconcile import Reconciler
from lightkube import ApiError

from tests.operator.test_reconcile import FakeKube, body, ready, reconciler


def plain_404() -> httpx2.HTTPStatusError:
    request = httpx2.Request("PATCH", "https://api/apis/keda.sh/v1alpha1/namespaces/ns/x/m")
    response = httpx2.Response(
        404, text="404 page not found\n", headers={"Content-Type": "text/plain"}, request=request
    )
    return httpx2.HTTPStatusError("404 Not Found", request=request, response=response)


async def test_an_answer_without_a_status_body_is_an_api_error() -> None:
    async def call() -> Any:
        raise plain_404()

    with pytest.raises(ApiError) as raised:
        await Kube(client=None)._call(call())  # type: ignore[arg-type]
    assert is_not_found(raised.value)
    assert raised.value.status.message == "404 page not found"


async def test_a_missing_keda_is_a_reason_not_a_retry() -> None:
    kube = FakeKube()

    async def no_scaled_objects(manifest: dict[str, Any], *, manager: str = "kubeonnx") -> Any:
        if manifest["kind"] == "ScaledObject":
            return await Kube(client=None)._call(raise_(plain_404()))  # type: ignore[arg-type]
        return await FakeKube.apply(kube, manifest, manager=manager)

    kube.apply = no_scaled_objects  # type: ignore[method-assign]
    scaling = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}
    await reconciler(kube).reconcile(body(scaling=scaling))  # no exception: nothing to retry
    assert ready(kube)["reason"] == "KedaNotInstalled"


async def raise_(exc: Exception) -> Any:
    raise exc


@pytest.mark.parametrize(
    "failure",
    [
        httpx2.ConnectError("All connection attempts failed"),
        httpx2.ReadTimeout("timed out"),
        plain_404().__class__(
            "502 Bad Gateway",
            request=plain_404().request,
            response=httpx2.Response(502, text="bad gateway", request=plain_404().request),
        ),
        OSError("Network is unreachable"),
    ],
    ids=["connect", "timeout", "status-without-body", "os"],
)
async def test_any_failure_of_a_write_is_a_reconcile_error(failure: Exception) -> None:
    kube = FakeKube()
    kube.refuse["Deployment"] = failure  # type: ignore[assignment]
    with pytest.raises(type(failure)):
        await reconciler(kube).reconcile(body())
    cond = ready(kube)
    assert cond["reason"] == "ReconcileError"
    assert cond["message"] == f"{type(failure).__name__}: {failure}"


async def test_a_pod_monitor_whose_crd_went_away_is_skipped() -> None:
    """The watch saw the PodMonitor CRD, which has been deleted since: the model is served
    without its PodMonitor, not failed."""
    kube = FakeKube()
    kube.refuse["PodMonitor"] = as_api_error(plain_404())
    rec = Reconciler(
        kube, OperatorConfig(), ObservedChildren(), now=lambda: "t", pod_monitor=lambda: True
    )  # type: ignore[arg-type]
    await rec.reconcile(body())
    assert ready(kube)["reason"] == "Progressing"
    assert "Deployment" in {m["kind"] for _, m in kube.applied}
