"""spec.traffic (issue 19): candidate versions beside the stable one, each in its own
Deployment with its own autoscaler, and the router in front of them. The rendering (the
stable's Deployment untouched by any candidate change, a promotion keeping the candidate's
Deployment), the router's file (the runtime's contract), the refusals the CRD's CEL repeats,
status.versions and an idle reconcile writing nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.quota import ResolvedQuota
from kubeonnx_operator.render import Model, render_children
from kubeonnx_operator.render.model import load_model
from kubeonnx_operator.render.versions import (
    ROUTER_CONFIG_ANNOTATION,
    VERSION_LABEL,
    VERSION_OF_LABEL,
    version_name,
)
from kubeonnx_operator.spec import InvalidSpec, parse_spec
from kubeonnx_operator.status import served_weights
from kubeonnx_runtime.router import RouterConfig

from tests.operator.test_reconcile import FakeKube, body, reconciler

ROOT = Path(__file__).resolve().parents[2]

MODEL_LABEL = "kubeonnx.io/inferencemodel"
STABLE = {"uri": "s3://models/mlp/1/model.onnx", "version": "1"}
ASYNC = {"enabled": True, "redis": {"url": "redis://r:6379"}}


def candidate(version: str = "2", **fields: Any) -> dict[str, Any]:
    return {"version": version, "model": {"uri": f"s3://models/mlp/{version}/model.onnx"}, **fields}


def raw(*candidates: dict[str, Any], model: dict[str, Any] = STABLE, **more: Any) -> dict[str, Any]:
    traffic = more.pop("traffic", {})
    spec: dict[str, Any] = {"model": model, "scaling": {"minReplicas": 1, "maxReplicas": 3}}
    if candidates or traffic:
        spec["traffic"] = {"candidates": list(candidates), **traffic}
    return {**spec, **more}


def children(
    spec: dict[str, Any],
    deployments: tuple[tuple[str, str | None], ...] = (),
    quota: ResolvedQuota | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    model = Model("mlp", "ns", parse_spec(spec), quota=quota, deployments=deployments)
    return {(c["kind"], c["metadata"]["name"]): c for c in render_children(model, OperatorConfig())}


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def router_file(got: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(got[("ConfigMap", "mlp-router")]["data"]["router.json"])
    return data


def test_without_candidates_there_is_one_deployment_and_no_router() -> None:
    got = children(raw())
    assert {k for k in got if k[0] == "Deployment"} == {("Deployment", "mlp")}
    assert ("ConfigMap", "mlp-router") not in got
    assert got[("Service", "mlp")]["spec"]["selector"] == {MODEL_LABEL: "mlp"}


def test_each_version_has_its_deployment_autoscaler_and_service_and_the_router_fronts_them() -> (
    None
):
    got = children(raw(candidate("2", weight=10), candidate("3", scaling={"minReplicas": 2})))
    deployments = {name for kind, name in got if kind == "Deployment"}
    assert deployments == {"mlp", "mlp-v2", "mlp-v3", "mlp-router"}
    hpas = {name: c["spec"] for (kind, name), c in got.items() if kind == "HorizontalPodAutoscaler"}
    assert {n: h["scaleTargetRef"]["name"] for n, h in hpas.items()} == {
        "mlp": "mlp",
        "mlp-v2": "mlp-v2",
        "mlp-v3": "mlp-v3",
    }
    # A candidate's scaling replaces the stable's whole: minReplicas 2 alone is 2..2.
    assert (hpas["mlp-v3"]["minReplicas"], hpas["mlp-v3"]["maxReplicas"]) == (2, 2)
    assert (hpas["mlp-v2"]["minReplicas"], hpas["mlp-v2"]["maxReplicas"]) == (1, 3)
    # No two Deployments select the same pods (an HPA refuses pods two of them select).
    selectors = {n: got[("Deployment", n)]["spec"]["selector"]["matchLabels"] for n in deployments}
    pods = {
        n: got[("Deployment", n)]["spec"]["template"]["metadata"]["labels"] for n in deployments
    }
    for name, selector in selectors.items():
        picked = {other for other, labels in pods.items() if selector.items() <= labels.items()}
        assert picked == {name}, name
    assert selectors["mlp-v2"] == {VERSION_OF_LABEL: "mlp", VERSION_LABEL: "2"}
    # Each version's Service selects its pods; the model's Service the router's.
    for version, deployment in (("1", "mlp"), ("2", "mlp-v2"), ("3", "mlp-v3")):
        service = got[("Service", f"mlp-v{version}")]
        assert service["spec"]["selector"] == selectors[deployment]
    assert got[("Service", "mlp")]["spec"]["selector"] == selectors["mlp-router"]
    assert env(got[("Deployment", "mlp-v3")])["KUBEONNX_MODEL_VERSION"] == "3"
    assert env(got[("Deployment", "mlp-v3")])["KUBEONNX_MODEL_URI"].endswith("/3/model.onnx")
    # Every child is watched as the model's (the label on its own metadata).
    assert all(c["metadata"]["labels"][MODEL_LABEL] == "mlp" for c in got.values())


def test_the_router_has_a_disruption_budget_as_each_version_has() -> None:
    """The router (two replicas in front of every version) had no PodDisruptionBudget: a
    node drain could evict both at once, and the model's Service reached nothing."""
    got = children(raw(candidate("2", weight=10)))
    router = got[("Deployment", "mlp-router")]
    pdb = got[("PodDisruptionBudget", "mlp-router")]
    assert router["spec"]["replicas"] > pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == router["spec"]["selector"]["matchLabels"]
    # It counts the router's pods alone, no version's.
    for (kind, name), child in got.items():
        if kind == "Deployment":
            labels = child["spec"]["template"]["metadata"]["labels"]
            assert (selector.items() <= labels.items()) == (name == "mlp-router"), name
    assert pdb["metadata"]["labels"][MODEL_LABEL] == "mlp"  # watched and pruned as the model's
    assert ("PodDisruptionBudget", "mlp-router") not in children(raw())


def test_the_router_file_is_the_runtimes_contract(tmp_path: Any) -> None:
    quota = ResolvedQuota(config={"tenantHeader": "X-Tenant-Key", "tenants": []})
    spec = raw(
        candidate("2", weight=10, mirrorPercent=20),
        candidate("3"),
        traffic={"sticky": True, "pinHeader": "X-Pin"},
    )
    got = children(spec, quota=quota)
    config = router_file(got)
    RouterConfig.model_validate(config)  # the router starts on it
    assert config["versions"] == [
        {"name": "1", "url": "http://mlp-v1.ns.svc.cluster.local", "weight": 90},
        {
            "name": "2",
            "url": "http://mlp-v2.ns.svc.cluster.local",
            "weight": 10,
            "mirror_percent": 20,
        },
        {"name": "3", "url": "http://mlp-v3.ns.svc.cluster.local", "weight": 0},
    ]
    assert (config["sticky"], config["pin_header"], config["tenant_header"]) == (
        True,
        "X-Pin",
        "X-Tenant-Key",
    )
    router = got[("Deployment", "mlp-router")]
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kubeonnx"]
    assert container["args"][:4] == ["serve", "--role", "router", "--router-config"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["router"]
    assert container["args"][4] == f"{mount}/router.json"
    # A mirror: the router and every candidate get the secret from the Secret NAME-mirror
    # (the router needs it; a version starts without it, and then charges copies).
    secret = {"secretKeyRef": {"name": "mlp-mirror", "key": "secret", "optional": True}}
    assert env(router)["KUBEONNX_MIRROR_SECRET"] == {
        "secretKeyRef": {"name": "mlp-mirror", "key": "secret"}
    }
    assert env(got[("Deployment", "mlp-v2")])["KUBEONNX_MIRROR_SECRET"] == secret
    assert env(got[("Deployment", "mlp-v3")])["KUBEONNX_MIRROR_SECRET"] == secret
    without = children(raw(candidate("2", weight=10)))
    assert "KUBEONNX_MIRROR_SECRET" not in env(without[("Deployment", "mlp-router")])


def test_a_changed_router_file_rolls_the_router_and_nothing_else() -> None:
    """The router reads its file at start: its digest in the pod template rolls it."""
    before = children(raw(candidate("2", weight=10)), (("mlp", "1"), ("mlp-v2", "2")))
    after = children(raw(candidate("2", weight=30)), (("mlp", "1"), ("mlp-v2", "2")))
    annotation = [
        got[("Deployment", "mlp-router")]["spec"]["template"]["metadata"]["annotations"][
            ROUTER_CONFIG_ANNOTATION
        ]
        for got in (before, after)
    ]
    assert annotation[0] != annotation[1]
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("ConfigMap", "mlp-router"), ("Deployment", "mlp-router")}


STABLE_KINDS = ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget")


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ((), (candidate("2", weight=10),)),  # a candidate added
        ((candidate("2", weight=10),), (candidate("2", weight=50, runtime={"threads": 2}),)),
        ((candidate("2", weight=10),), ()),  # removed
        ((candidate("2"),), (candidate("2", mirrorPercent=50), candidate("3", weight=5))),
    ],
    ids=["added", "changed", "removed", "mirrored-and-another"],
)
def test_no_candidate_change_touches_the_stables_children(
    first: tuple[dict[str, Any], ...], then: tuple[dict[str, Any], ...]
) -> None:
    seen = (("mlp", "1"), ("mlp-v2", "2"))
    before = children(raw(*first, **{"async": ASYNC}), seen)
    after = children(raw(*then, **{"async": ASYNC}), seen)
    for kind in STABLE_KINDS:
        assert before[(kind, "mlp")] == after[(kind, "mlp")], kind


def test_the_async_queue_is_the_stables_alone() -> None:
    spec = raw(
        candidate("2", weight=10, scaling={"autoscaler": "keda", "maxReplicas": 2}),
        **{"async": ASYNC, "scaling": {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}},
    )
    got = children(spec)
    assert env(got[("Deployment", "mlp")])["KUBEONNX_ASYNC_REDIS_URL"] == "redis://r:6379"
    assert not any(k.startswith("KUBEONNX_ASYNC") for k in env(got[("Deployment", "mlp-v2")]))
    triggers = {
        name: [t["name"] for t in got[("ScaledObject", name)]["spec"]["triggers"]]
        for name in ("mlp", "mlp-v2")
    }
    assert triggers == {"mlp": ["inflight", "queue"], "mlp-v2": ["inflight"]}
    # Each version scales on its own pods' in-flight requests.
    query = got[("ScaledObject", "mlp-v2")]["spec"]["triggers"][0]["metadata"]["query"]
    assert 'model="mlp",version="2"}' in query


def test_promotion_keeps_the_candidates_deployment_as_it_is() -> None:
    """The candidate moved into spec.model: the Deployment labelled with its version is
    the stable's now, rendered exactly as before (no rollout, no new download); the old
    stable's is no longer rendered (the reconciler prunes it)."""
    seen = (("mlp", "1"), ("mlp-v2", "2"))
    source = {"uri": "s3://models/mlp/2/model.onnx"}
    overrides = {"runtime": {"maxBatchSize": 8}, "resources": {"requests": {"cpu": "2"}}}
    before = children(raw(candidate("2", weight=50, **overrides)), seen)
    promoted = children(raw(model={**source, "version": "2"}, **overrides), seen)
    assert promoted[("Deployment", "mlp-v2")] == before[("Deployment", "mlp-v2")]
    assert (
        promoted[("HorizontalPodAutoscaler", "mlp-v2")]
        == before[("HorizontalPodAutoscaler", "mlp-v2")]
    )
    assert ("Deployment", "mlp") not in promoted and ("Deployment", "mlp-router") not in promoted
    selector = before[("Deployment", "mlp-v2")]["spec"]["selector"]["matchLabels"]
    assert promoted[("Service", "mlp")]["spec"]["selector"] == selector
    # A later candidate (say "3") leaves the promoted stable where it is.
    later = children(
        raw(candidate("3", weight=5), model={**source, "version": "2"}, **overrides),
        (("mlp-v2", "2"),),
    )
    assert later[("Deployment", "mlp-v2")] == before[("Deployment", "mlp-v2")]
    assert ("Deployment", "mlp-v3") in later and ("Deployment", "mlp") not in later


def test_a_version_keeps_the_deployment_labelled_with_it() -> None:
    # The old stable ("1", in mlp) comes back as a candidate beside a new stable "2".
    got = children(
        raw(
            candidate("1", weight=10), model={"uri": "s3://models/mlp/2/model.onnx", "version": "2"}
        ),
        (("mlp", "1"),),
    )
    assert env(got[("Deployment", "mlp")])["KUBEONNX_MODEL_VERSION"] == "1"
    assert env(got[("Deployment", "mlp-v2")])["KUBEONNX_MODEL_VERSION"] == "2"


@pytest.mark.parametrize(
    ("version", "other"),
    [
        ("1.0", "1-0"),
        ("RC", "rc"),
        ("a_b", "a-b"),
        ("x" * 63, "x" * 62),
        ("1.0", "1-0-d0ff5974"),  # the name of "1.0" as a version of its own
        ("1.0", "1-0-d0ff5974-e6e2ba26"),
    ],
)
def test_version_names_are_dns_labels_and_never_shared(version: str, other: str) -> None:
    names = {version_name("m" * 56, version), version_name("m" * 56, other)}
    assert len(names) == 2
    assert version_name("h", version) != version_name("h", other)
    for name in names:
        assert len(name) <= 63 and name == name.lower() and not name.endswith("-")
    assert version_name("mlp", "2") == "mlp-v2"


REFUSED = [
    (raw(candidate("1")), "spec.traffic.candidates[].version"),
    (raw(candidate("2"), candidate("2")), "must be unique"),
    (raw(candidate("2", weight=60), candidate("3", weight=50)), "sum to more than 100"),
    (
        raw(candidate("2"), candidate("3"), traffic={"rollout": {"steps": [{"weight": 5}]}}),
        "exactly one candidate",
    ),
    (raw(candidate("2", weight=5), traffic={"rollout": {"steps": [{"weight": 5}]}}), "must be 0"),
    (
        raw(candidate("2"), traffic={"rollout": {"steps": [{"weight": 5, "pause": {}}]}}),
        "exactly one of weight or pause",
    ),
    (raw(candidate("2"), traffic={"rollout": {"steps": []}}), "steps"),
    (raw(candidate("2", weight=101)), "weight"),
    (raw(candidate("v/2")), "version"),
    (raw(*(candidate(str(v)) for v in range(2, 6))), "candidates"),
    (raw(candidate("2", scaling={"minReplicas": 0, "maxReplicas": 2})), "minReplicas 0"),
    (raw(traffic={"pinHeader": "X Pin"}), "pinHeader"),
]


@pytest.mark.parametrize(("spec", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_the_typed_spec_refuses_what_the_crd_refuses(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec)


def test_a_long_name_is_refused_with_candidates() -> None:
    load_model("a" * 57, "ns", raw(), OperatorConfig())
    with pytest.raises(InvalidSpec, match="at most 56 characters"):
        load_model("a" * 57, "ns", raw(candidate()), OperatorConfig())


@pytest.mark.parametrize(
    ("desired", "ready", "served"),
    [
        ([90, 10], [True, False], [100, 0]),  # a candidate serves nothing until ready
        ([90, 10], [True, True], [90, 10]),
        ([90, 10], [False, True], [0, 100]),
        ([0, 100], [True, False], [0, 0]),  # the router answers 503: nothing is served
        ([70, 20, 10], [True, True, False], [78, 22, 0]),
        ([90, 10], [False, False], [0, 0]),
    ],
)
def test_served_weights(desired: list[int], ready: list[bool], served: list[int]) -> None:
    assert served_weights(desired, ready) == served


def watched(kube: FakeKube, name: str, ready: int) -> dict[str, Any]:
    """The Deployment `name` as applied, as the watch shows it with `ready` replicas."""
    obj = copy.deepcopy(kube.live[("Deployment", name)])
    obj["metadata"]["uid"] = f"{name}-uid"
    obj["spec"]["replicas"] = 1
    obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "readyReplicas": ready}
    return obj


async def test_status_versions_and_an_idle_reconcile_writes_nothing() -> None:
    kube = FakeKube()
    made: set[str] = set()

    async def metadata(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        exists = name != "m-mirror" or name in made
        return {"kind": "PartialObjectMetadata"} if exists else None

    kube.metadata = metadata  # type: ignore[method-assign]
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    rec.secrets.clock = lambda: 0.0  # a missing Secret is asked about again at once
    im = body(traffic={"candidates": [candidate("2", weight=10, mirrorPercent=5)]})
    # Mirrored: nothing is applied until the mirror Secret exists (the operator writes none).
    await rec.reconcile(im)
    assert kube.applied == []
    (condition,) = kube.statuses[-1]["conditions"]
    assert condition["reason"] == "MirrorSecretNotFound"
    assert "'m-mirror'" in condition["message"] and "mirrorPercent" in condition["message"]
    made.add("m-mirror")
    rec.secrets.recheck_missing("ns")
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    assert not any(m["kind"] == "Secret" for _, m in kube.applied)
    # The watch shows what was applied: the stable ready, the candidate not yet.
    for (kind, _), live in kube.live.items():
        if kind != "Secret":
            observed.record(("ns", "m"), live, deleted=False)
    observed.record(("ns", "m"), watched(kube, "m", ready=1), deleted=False)
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=0), deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    versions = kube.statuses[-1]["versions"]
    assert versions == [
        {
            "version": "1",
            "role": "stable",
            "weight": 100,
            "desiredWeight": 90,
            "readyReplicas": 1,
            "replicas": 1,
            "deployment": "m",
        },
        {
            "version": "2",
            "role": "candidate",
            "weight": 0,
            "desiredWeight": 10,
            "readyReplicas": 0,
            "replicas": 1,
            "deployment": "m-v2",
        },
    ]
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=1), deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    assert [v["weight"] for v in kube.statuses[-1]["versions"]] == [90, 10]
    # Idle: the same body again writes nothing (no apply, no status, no Secret).
    im["status"] = kube.statuses[-1]
    writes = (len(kube.applied), len(kube.statuses), len(kube.deleted))
    await rec.reconcile(copy.deepcopy(im))
    assert (len(kube.applied), len(kube.statuses), len(kube.deleted)) == writes
    # The candidate removed: status.versions goes (null in the merge patch), its
    # Deployment, Service, autoscaler and the router are pruned; the stable stays.
    im["spec"] = {k: v for k, v in im["spec"].items() if k != "traffic"}
    await rec.reconcile(im)
    assert kube.statuses[-1]["versions"] is None
    assert ("Deployment", "m-v2", "m-v2-uid") in kube.deleted
    pruned = {name for kind, name, _ in kube.deleted}
    assert {"m-router", "m-v1", "m-v2"} <= pruned and "m" not in pruned
    assert "PodDisruptionBudget" in {kind for kind, name, _ in kube.deleted if name == "m-router"}


def test_status_versions_is_documented_for_the_printer_columns() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml").read_text())
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Version"] == ".status.version"
    assert columns["Canary"] == ".status.versions[1].weight"
    assert columns["Phase"] == ".status.rollout.phase"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    fields = set(status["versions"]["items"]["properties"])
    assert fields == {
        "version",
        "role",
        "weight",
        "desiredWeight",
        "readyReplicas",
        "replicas",
        "deployment",
    }
    assert "phase" in status["rollout"]["properties"]


async def test_a_candidates_missing_credentials_secret_is_named() -> None:
    kube = FakeKube()

    async def metadata(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return None if name == "v2-creds" else {"kind": "PartialObjectMetadata"}

    kube.metadata = metadata  # type: ignore[method-assign]
    source = {"uri": "s3://b/2.onnx", "s3": {"credentialsSecret": "v2-creds"}}
    im = body(traffic={"candidates": [{"version": "2", "model": source}]})
    await reconciler(kube).reconcile(im)
    assert kube.applied == []
    (condition,) = kube.statuses[-1]["conditions"]
    assert condition["reason"] == "CredentialsSecretNotFound"
    assert "spec.traffic.candidates[0].model.s3.credentialsSecret" in condition["message"]


def crashing_pod(labels: dict[str, str], uid: str) -> dict[str, Any]:
    state = {"waiting": {"reason": "CrashLoopBackOff"}}
    last = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"uid": uid, "namespace": "ns", "labels": labels, "creationTimestamp": "t"},
        "status": {
            "containerStatuses": [
                {"name": "runtime", "restartCount": 4, "state": state, "lastState": last}
            ]
        },
    }


async def test_the_stables_pods_name_its_problems_whichever_deployment_it_is() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    im = body(model={"uri": "s3://b/m.onnx", "version": "2"})
    await rec.reconcile(im)
    # As after a promotion: the Deployment of version 2 is m-v2.
    promoted = watched(kube, "m", ready=0)
    promoted["metadata"].update(name="m-v2", uid="m-v2-uid")
    promoted["metadata"]["labels"]["kubeonnx.io/version"] = "2"
    observed.record(("ns", "m"), promoted, deleted=False)
    # A candidate's crashing pod (version 3) is not the stable's problem ...
    candidate_pod = crashing_pod({VERSION_OF_LABEL: "m", VERSION_LABEL: "3"}, "p3")
    observed.record(("ns", "m"), candidate_pod, deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    assert rec.stable_names[("ns", "m")] == "m-v2"
    assert kube.statuses[-1]["conditions"][0]["reason"] == "Progressing"
    # ... the stable's own is, though its pods carry no kubeonnx.io/inferencemodel label.
    stable_pod = crashing_pod({VERSION_OF_LABEL: "m", VERSION_LABEL: "2"}, "p2")
    observed.record(("ns", "m"), stable_pod, deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    assert kube.statuses[-1]["conditions"][0]["reason"] == "CrashLoop"


def test_a_versions_pods_are_watched_as_the_models() -> None:
    from kubeonnx_operator.config import OperatorConfig as Config
    from kubeonnx_operator.handlers import VERSION_POD_SELECTOR, Controller

    controller = Controller(None, Config(leader_election=False), ["ns"])  # type: ignore[arg-type]
    pod_watches = [i.labels for i in controller.informers if i.kind == "Pod"]
    assert VERSION_POD_SELECTOR in pod_watches and len(pod_watches) == 2
    controller._child_event("ADDED", crashing_pod({VERSION_OF_LABEL: "m", VERSION_LABEL: "2"}, "p"))
    assert len(controller.observed.pods(("ns", "m"), "2")) == 1
    assert controller.observed.pods(("ns", "m")) == []


async def test_a_new_stable_version_after_a_promotion_rolls_the_stables_deployment() -> None:
    """Promoted "2" runs in m-v2 (m is gone); spec.model.version "3" rolls m-v2 in place
    (its selector, which cannot change, keeps naming version 2): no new Deployment m, no
    switch of Service m, nothing pruned."""
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    im = body(traffic={"candidates": [candidate("2", weight=50)]})
    await rec.reconcile(im)
    for live in kube.live.values():
        observed.record(("ns", "m"), live, deleted=False)
    promoted = body(model={"uri": "s3://models/mlp/2/model.onnx", "version": "2"})
    await rec.reconcile(promoted)
    for kind, name, _ in kube.deleted:
        observed.record(("ns", "m"), {**kube.live.pop((kind, name)), "kind": kind}, deleted=True)
    assert {"m", "m-router"} <= {name for _, name, _ in kube.deleted}
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=1), deleted=False)
    selector = kube.live[("Deployment", "m-v2")]["spec"]["selector"]
    service = kube.live[("Service", "m")]["spec"]["selector"]
    deleted, applied = len(kube.deleted), len(kube.applied)

    await rec.reconcile(body(model={"uri": "s3://models/mlp/3/model.onnx", "version": "3"}))
    names = [(m["kind"], m["metadata"]["name"]) for _, m in kube.applied[applied:]]
    assert ("Deployment", "m") not in names and ("Deployment", "m-v2") in names
    assert len(kube.deleted) == deleted  # m-v2's pods keep serving
    rolled = kube.live[("Deployment", "m-v2")]
    assert rolled["spec"]["selector"] == selector
    assert env(rolled)["KUBEONNX_MODEL_VERSION"] == "3"
    assert rolled["metadata"]["labels"][VERSION_LABEL] == "3"
    assert kube.live[("Service", "m")]["spec"]["selector"] == service == selector["matchLabels"]
    # The next reconcile finds the stable by its label: still m-v2.
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=1), deleted=False)
    await rec.reconcile(body(model={"uri": "s3://models/mlp/3/model.onnx", "version": "3"}))
    assert rec.stable_names[("ns", "m")] == "m-v2"
    assert len(kube.deleted) == deleted


async def test_a_candidate_the_rolled_stable_selects_is_refused() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    # As the test above leaves it: m-v2 serves version 3 and selects version 2's pods.
    await rec.reconcile(body(model={"uri": "s3://b/2.onnx", "version": "2"}))
    rolled = watched(kube, "m", ready=1)
    rolled["metadata"].update(name="m-v2", uid="m-v2-uid")
    rolled["metadata"]["labels"][VERSION_LABEL] = "3"
    rolled["spec"]["selector"] = {"matchLabels": {VERSION_OF_LABEL: "m", VERSION_LABEL: "2"}}
    observed.record(("ns", "m"), rolled, deleted=False)
    applied = len(kube.applied)
    im = body(
        model={"uri": "s3://b/3.onnx", "version": "3"},
        traffic={"candidates": [candidate("2", weight=10)]},
    )
    await rec.reconcile(im)
    assert len(kube.applied) == applied
    (condition,) = kube.statuses[-1]["conditions"]
    assert condition["reason"] == "InvalidSpec"
    assert "'2'" in condition["message"] and "m-v2" in condition["message"]


async def test_service_switches_to_the_router_once_ready_and_back_before_it_goes() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    stable = {MODEL_LABEL: "m"}
    router = {"kubeonnx.io/router": "m"}
    await rec.reconcile(body())
    for live in kube.live.values():
        observed.record(("ns", "m"), live, deleted=False)
    im = body(traffic={"candidates": [candidate("2", weight=10)]})
    await rec.reconcile(im)
    # The router is made, but Service m keeps the stable's pods until it has a ready one.
    assert ("Deployment", "m-router") in kube.live
    assert kube.live[("Service", "m")]["spec"]["selector"] == stable
    for live in kube.live.values():
        observed.record(("ns", "m"), live, deleted=False)
    await rec.reconcile(im)
    assert kube.live[("Service", "m")]["spec"]["selector"] == stable
    observed.record(("ns", "m"), watched(kube, "m-router", ready=1), deleted=False)
    await rec.reconcile(im)
    assert kube.live[("Service", "m")]["spec"]["selector"] == router
    observed.record(("ns", "m"), kube.live[("Service", "m")], deleted=False)

    # The candidate removed: Service m back to the stable first, the router kept ...
    await rec.reconcile(body())
    assert kube.live[("Service", "m")]["spec"]["selector"] == stable
    assert kube.deleted == []
    # ... and deleted once the watch shows the Service selecting the stable.
    observed.record(("ns", "m"), kube.live[("Service", "m")], deleted=False)
    await rec.reconcile(body())
    assert {"m-router", "m-v2"} <= {name for _, name, _ in kube.deleted}


@pytest.mark.parametrize("taken", ["m-v2", "m-router"])
async def test_a_version_name_another_model_holds_stops_the_switch(taken: str) -> None:
    """Model `m` with candidate 2 renders m-v2 and m-router, names a model called `m-v2`
    (or `m-router`) already uses: nothing is applied, so neither Service m nor the router
    points at the other model's objects, and the reason names the object."""
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    await rec.reconcile(body())
    for live in kube.live.values():
        observed.record(("ns", "m"), live, deleted=False)
    other = {"kind": "InferenceModel", "name": taken, "uid": "other", "controller": True}
    for kind in ("Service", "Deployment"):
        kube.live[(kind, taken)] = {
            "kind": kind,
            "metadata": {"name": taken, "ownerReferences": [other]},
        }
    applied = len(kube.applied)
    await rec.reconcile(body(traffic={"candidates": [candidate("2", weight=10)]}))
    assert kube.applied[applied:] == []
    (condition,) = kube.statuses[-1]["conditions"]
    assert condition["reason"] == "ChildConflict"
    assert taken in condition["message"] and f"InferenceModel {taken}" in condition["message"]


def test_kubeonnx_render_reports_names_two_models_share() -> None:
    from kubeonnx_operator.cli import render_documents

    def doc(name: str, *candidates: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "InferenceModel", "metadata": {"name": name}, "spec": raw(*candidates)}

    out, problems = render_documents(
        [("a.yaml", doc("mlp", candidate("2", weight=10))), ("b.yaml", doc("mlp-v2"))],
        OperatorConfig(),
    )
    assert any("InferenceModel default/mlp-v2" in p and "Deployment mlp-v2" in p for p in problems)
    names = [(c["kind"], c["metadata"]["name"]) for c in out]
    assert len(names) == len(set(names))
    _, fine = render_documents(
        [("a.yaml", doc("mlp", candidate("2", weight=10))), ("b.yaml", doc("other"))],
        OperatorConfig(),
    )
    assert fine == []
