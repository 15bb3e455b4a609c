"""Tenants stay apart: a tenant named `default` is refused (it would merge with the keyless
callers), same-named policies in two namespaces count apart on one Redis, and a request
naming two API keys is refused."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
from kubeonnx_operator.quota import QuotaProblem, parse_policy, resolve_quota, runtime_config
from kubeonnx_operator.spec import InvalidSpec
from kubeonnx_runtime.quota import QuotaConfig, key_hash
from pydantic import ValidationError

from e2e.redis_server import LocalRedis
from tests.runtime.conftest import start_server
from tests.runtime.test_quota_redis import body, not_near_midnight, serve_mlp, write_policy
from tests.runtime.test_router import raw_exchange

RESERVED = "'default' is reserved for requests without a known key"


def default_named_policy() -> dict:  # type: ignore[type-arg]
    return {
        "tenants": [{"name": "default", "apiKeySecret": {"name": "k", "key": "token"}}],
        "defaultTenant": {"limits": [{"unit": "requests", "limit": 5, "window": "1m"}]},
    }


def test_the_operator_refuses_a_tenant_named_default() -> None:
    with pytest.raises(InvalidSpec, match=RESERVED):
        parse_policy(default_named_policy())
    body = {"spec": default_named_policy()}
    with pytest.raises(QuotaProblem, match=RESERVED) as problem:
        resolve_quota("team", "vision", body, replicas=1)
    assert problem.value.reason == "QuotaPolicyInvalid"


def test_the_runtime_refuses_a_tenant_named_default(tmp_path: Path, models) -> None:  # type: ignore[no-untyped-def]
    """A configuration written by hand (or by an older operator) does not start either."""
    raw = {
        "policy": "team",
        "namespace": "tests",
        "tenants": [{"name": "default", "keySha256": [key_hash("k")]}],
        "defaultTenant": {"limits": []},
    }
    with pytest.raises(ValidationError, match=RESERVED):
        QuotaConfig.model_validate(raw)
    config = tmp_path / "quota.json"
    config.write_text(json.dumps(raw))
    served = start_server(
        tmp_path,
        "--model-uri",
        f"file://{models['mlp']}",
        "--quota-config",
        str(config),
        wait_ready=False,
    )
    assert served.proc.wait(60) != 0
    message = served.termination_log.read_text()
    assert "invalid quota configuration" in message and RESERVED in message, message


def test_same_named_policies_in_two_namespaces_count_apart(
    serve, models, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    not_near_midnight()
    name = f"team-{uuid.uuid4().hex[:6]}"
    limits = {"acme": [{"unit": "requests", "limit": 3, "window": "1d"}]}
    servers = {}
    for namespace in ("vision", "speech"):
        config = write_policy(
            tmp_path, redis_server.url, limits, namespace=namespace, decisionBudgetMs=10000
        )
        policy = json.loads(config.read_text())
        policy["policy"] = name  # the same policy name in both namespaces
        config.write_text(json.dumps(policy))
        servers[namespace] = serve_mlp(serve, models, config)
    with httpx.Client(timeout=30) as http:
        for namespace, served in servers.items():
            codes = [
                http.post(
                    f"{served.url}/v2/models/mlp/infer",
                    json=body(1),
                    headers={"X-Api-Key": "acme-key"},
                ).status_code
                for _ in range(4)
            ]
            assert codes == [200, 200, 200, 429], (namespace, codes)  # its own 3, not shared
    keys = sorted(
        k.decode() for k in redis_server.client().scan_iter(f"kubeonnx:*/{name}/*:requests-*")
    )
    assert [k.split("}")[0] for k in keys] == [
        f"kubeonnx:{{speech/{name}/acme",
        f"kubeonnx:{{vision/{name}/acme",
    ]


def test_the_operator_writes_the_namespace_into_the_runtimes_file() -> None:
    spec = parse_policy({"tenants": []})
    config = runtime_config("team", "vision", spec, replicas=1)
    assert QuotaConfig.model_validate(config).namespace == "vision"


def test_two_api_keys_in_one_request_are_refused(
    serve, models, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """/infer read the last of two X-Api-Key headers and the other routes the first: a
    request could be charged to one tenant and read another's results."""
    limits = {"acme": [], "globex": []}
    config = write_policy(tmp_path, redis_server.url, limits, decisionBudgetMs=10000)
    served = serve_mlp(serve, models, config)
    both = [("X-Api-Key", "acme-key"), ("X-Api-Key", "globex-key")]
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for answer in (
            http.post("/v2/models/mlp/infer", json=body(1), headers=both),
            http.get("/v2/quota", headers=both),
        ):
            assert answer.status_code == 400, answer.text
            assert "header X-Api-Key is given more than once" in answer.json()["error"]
        one = http.post("/v2/models/mlp/infer", json=body(1), headers={"X-Api-Key": "acme-key"})
        assert one.status_code == 200


def test_an_api_key_in_a_trailer_names_no_tenant(tmp_path: Path, models) -> None:  # type: ignore[no-untyped-def]
    """Trailer fields are not headers (RFC 9110 6.5.1): a chunked request whose trailer
    holds a tenant's key (or the mirror marker) is charged to nobody's account but the
    keyless caller's. The server appended trailers to the request's headers, read when the
    whole request had arrived before its handler ran."""
    config = tmp_path / "quota.json"
    config.write_text(
        json.dumps(
            {
                "policy": "trailers",
                "namespace": "tests",
                "tenants": [
                    {
                        "name": "acme",
                        "keySha256": [key_hash("acme-key")],
                        "limits": [{"unit": "requests", "limit": 1000, "window": "1d"}],
                    }
                ],
                "defaultTenant": {"limits": [{"unit": "requests", "limit": 1000, "window": "1d"}]},
            }
        )
    )
    served = start_server(
        tmp_path,
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--quota-config",
        str(config),
    )
    try:
        data = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
        ).encode()
        request = (
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            b"content-type: application/json\r\n\r\n%x\r\n%b\r\n0\r\n"
            b"X-Api-Key: acme-key\r\n\r\n" % (len(data), data)
        )
        (answer,) = raw_exchange(served.url, request, 1)
        assert "outputs" in json.loads(answer), answer
        with httpx.Client(base_url=served.url, timeout=30) as http:
            acme = http.get("/v2/quota", headers={"X-Api-Key": "acme-key"}).json()
            keyless = http.get("/v2/quota").json()
        assert acme["limits"][0]["used"] == 0, acme
        assert keyless["limits"][0]["used"] == 1, keyless
    finally:
        served.stop()
