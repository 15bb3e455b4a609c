"""crds/ is the contract: every example fits its CRD's schema, and the chart carries crds/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _strip_k8s(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_k8s(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if isinstance(schema, list):
        return [_strip_k8s(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strip_k8s(version["schema"]["openAPIV3Schema"])
    return schemas


EXAMPLE_DOCS = [
    pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}")
    for path in sorted((ROOT / "examples").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("apiVersion", "").startswith("kubeonnx.io/")
]


@pytest.mark.parametrize("doc", EXAMPLE_DOCS)
def test_every_example_fits_its_crd_schema(doc: dict[str, Any]) -> None:
    schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    jsonschema.validate(doc, schema)


def test_every_schema_field_has_a_description() -> None:
    missing = []

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, sub in (schema.get("properties") or {}).items():
            if name not in {"apiVersion", "kind", "metadata"} and not sub.get("description"):
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    for (_, kind), schema in crd_schemas().items():
        walk(schema, kind)
    assert not missing


def test_chart_carries_the_same_crds() -> None:
    chart_crds = ROOT / "charts" / "kubeonnx" / "crds"
    for path in (ROOT / "crds").glob("*.yaml"):
        assert (chart_crds / path.name).read_text() == path.read_text(), path.name


def test_the_quota_file_the_operator_renders_is_the_one_the_runtime_reads(tmp_path: Path) -> None:
    """The operator and the runtime may not import each other; this holds them together:
    the ConfigMap's file names each tenant's keys where the pod mounts its Secret."""
    import hashlib
    import json

    from kubeonnx_operator.cli import render_documents
    from kubeonnx_operator.config import OperatorConfig
    from kubeonnx_runtime.quota import load_quota_config

    example = ROOT / "examples" / "quota-policy.yaml"
    docs = [(example.name, d) for d in yaml.safe_load_all(example.read_text()) if d]
    rendered, problems = render_documents(docs, OperatorConfig())
    assert not problems
    children = {c["kind"]: c for c in rendered}
    assert "Secret" not in children  # the operator makes no Secret and holds no key
    text = children["ConfigMap"]["data"]["config.json"]
    pod = children["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "quota"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "quota"]
    assert env["KUBEONNX_QUOTA_CONFIG"] == f"{mount['mountPath']}/config.json"
    assert "subPath" not in mount  # so the kubelet updates the files in place
    # Lay the volume out as the kubelet would, under tmp_path, and let the runtime load it.
    secrets = {d["metadata"]["name"]: d["stringData"] for _, d in docs if d["kind"] == "Secret"}
    data = {children["ConfigMap"]["metadata"]["name"]: children["ConfigMap"]["data"]}
    for source in volume["projected"]["sources"]:
        ((kind, ref),) = source.items()
        values = secrets[ref["name"]] if kind == "secret" else data[ref["name"]]
        for item in ref["items"]:
            target = tmp_path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(values[item["key"]])
    config = load_quota_config(tmp_path / "config.json")
    acme = next(t for t in config.tenants if t.name == "acme")
    assert acme.key_sha256 == [hashlib.sha256(b"acme-example-key").hexdigest()]
    assert "acme-example-key" not in json.dumps(json.loads(text))  # no key in the ConfigMap
    assert config.replicas == 2 and config.failure_mode == "Local"


@pytest.mark.parametrize(
    ("image", "extras"), [("operator", ["operator"]), ("runtime", ["runtime", "gpu"])]
)
def test_each_image_pins_every_dependency(image: str, extras: list[str]) -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pinned = {}
    for line in (ROOT / image / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.lower().replace("_", "-")] = version
    for requirement in wanted:
        name = re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert pinned.get(name), f"{name} is not pinned in {image}/constraints.txt"
    dockerfile = (ROOT / f"Dockerfile.{image}").read_text()
    assert f"-c {image}/constraints.txt" in dockerfile or (
        f"COPY {image}/constraints.txt ./constraints.txt" in dockerfile
        and dockerfile.count("pip install -c constraints.txt") >= 2
    ), f"Dockerfile.{image} does not install with -c {image}/constraints.txt"


SCHEMA_KEYWORDS = {
    "type",
    "description",
    "properties",
    "items",
    "required",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "additionalProperties",
    "anyOf",
    "nullable",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def test_every_schema_node_is_made_of_openapi_keywords() -> None:
    """A comma in a flow mapping's description (`{description: a, b}`) makes a stray key
    that the API server refuses: caught here, before the e2e suite."""
    stray = []

    def walk(schema: dict[str, Any], path: str) -> None:
        stray.extend(f"{path}: {k}" for k in set(schema) - SCHEMA_KEYWORDS)
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                walk(schema[key], f"{path}[]")

    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            walk(version["schema"]["openAPIV3Schema"], path.name)
            for column in version.get("additionalPrinterColumns") or []:
                keys = {"name", "type", "jsonPath", "description", "priority", "format"}
                stray.extend(f"{path.name} column: {k}" for k in set(column) - keys)
    assert stray == []
