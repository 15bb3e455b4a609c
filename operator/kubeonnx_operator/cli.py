"""`kubeonnx operator` and `kubeonnx render`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import OperatorConfig, load_config
from .quota import QuotaProblem, parse_policy, resolve_quota
from .render import render_children
from .render.model import load_model
from .spec import InvalidSpec


def _config(path: str | None) -> OperatorConfig:
    try:
        return load_config(path)
    except (OSError, ValueError, ValidationError) as exc:
        raise SystemExit(
            f"kubeonnx: bad operator config {path or '(environment)'}: {exc}"
        ) from None


def _check_cluster_config() -> None:
    """Exit in one line when there is no cluster to connect to: not in a pod, and KUBECONFIG
    (or ~/.kube/config) missing or unreadable. kopf would retry its login every minute."""
    from lightkube.config.kubeconfig import KubeConfig

    try:
        config = KubeConfig.from_env().get()
    except Exception as exc:  # any reason: a missing file, bad YAML, no context
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        reason = f"it has no {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise SystemExit(
            f"kubeonnx operator: cannot read the kubeconfig {where} (and not in a pod with a "
            f"service account): {reason}"
        ) from None
    if config is None or config.user is None:
        raise SystemExit(
            f"kubeonnx operator: the kubeconfig {os.environ.get('KUBECONFIG') or '~/.kube/config'}"
            " has no current context with a user"
        )


def run_operator(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubeonnx operator", description="Run the kubeonnx operator (kopf)."
    )
    parser.add_argument("--config", help="operator config YAML (or KUBEONNX_OPERATOR_CONFIG)")
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = _config(args.config)
    namespaces = args.namespace or config.namespaces
    _check_cluster_config()

    import kopf

    from .handlers import build_registry

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf runs the process; the operator's watches, leader election and health endpoints
    # (/healthz, /readyz, /metrics on the health port) are its own (handlers.Controller).
    kopf.run(registry=build_registry(config, namespaces), standalone=True, clusterwide=True)
    return 0


def _documents(path: str) -> list[Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def render_documents(
    docs: list[tuple[str, Any]],
    config: OperatorConfig,
    *,
    pod_monitor: bool = False,
    namespace: str = "default",
) -> tuple[list[dict[str, Any]], list[str]]:
    """The children of every InferenceModel among `docs` ((file, document) pairs), and the
    problems that kept any from rendering. A model's QuotaPolicy is taken from the same
    documents, as the operator takes it from the cluster (its Secrets are only mounted); a
    document without metadata.namespace is in `namespace`, as `kubectl apply -n` puts it."""
    default_namespace = namespace

    def by_kind(kind: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {
            (
                (d.get("metadata") or {}).get("namespace") or default_namespace,
                d["metadata"]["name"],
            ): d
            for _, d in docs
            if isinstance(d, dict)
            and d.get("kind") == kind
            and (d.get("metadata") or {}).get("name")
        }

    policies = by_kind("QuotaPolicy")
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    owners: dict[tuple[str, str, str, str], str] = {}  # (apiVersion, kind, ns, name) -> model
    for key, raw in policies.items():
        try:  # strict, unlike the operator: a field this version does not know is an error
            parse_policy(raw.get("spec"), strict=True)
        except InvalidSpec as exc:
            problems.append(f"QuotaPolicy {'/'.join(key)}: {exc}")
    for path, doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "InferenceModel":
            continue
        meta = doc.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace") or default_namespace
        if not name:
            problems.append(f"{path}: an InferenceModel has no metadata.name")
            continue
        where = f"{path}: InferenceModel {namespace}/{name}"
        try:
            model = load_model(name, namespace, doc.get("spec"), config)
        except InvalidSpec as exc:
            problems.append(f"{where}: {exc}")
            continue
        if model.spec.quota_policy:
            policy = policies.get((namespace, model.spec.quota_policy))
            try:
                quota = resolve_quota(
                    model.spec.quota_policy, namespace, policy, model.spec.scaling.max_replicas
                )
            except QuotaProblem as exc:
                problems.append(f"{where}: {exc} (give it in the same files)")
                continue
            model = dataclasses.replace(model, quota=quota)
        for child in render_children(model, config, pod_monitor=pod_monitor):
            ident = (child["apiVersion"], child["kind"], namespace, child["metadata"]["name"])
            other = owners.setdefault(ident, f"InferenceModel {namespace}/{name}")
            if other != f"InferenceModel {namespace}/{name}":
                # In a cluster one of them would be refused (ChildConflict): said here.
                problems.append(
                    f"{where}: its {child['kind']} {child['metadata']['name']} is also "
                    f"{other}'s: rename one of the models (or a version)"
                )
                continue
            out.append(child)
    return out, problems


def render(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kubeonnx render",
        description="Print the manifests the operator would apply for the InferenceModels in "
        "FILE, without a cluster.",
    )
    parser.add_argument(
        "-f",
        "--filename",
        required=True,
        action="append",
        help="YAML file with InferenceModels ('-' for stdin; repeatable)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        help="namespace of the documents that name none (default: default); documents that "
        "name another are refused, as kubectl apply -n refuses them",
    )
    parser.add_argument("--config", help="operator config YAML")
    parser.add_argument(
        "--pod-monitor",
        action="store_true",
        help="also print PodMonitors (as the operator does where their CRD is installed)",
    )
    args = parser.parse_args(argv)
    config = _config(args.config)

    docs: list[tuple[str, Any]] = []
    errors = 0
    for path in args.filename:
        try:
            docs += [(path, doc) for doc in _documents(path)]
        except (OSError, yaml.YAMLError) as exc:
            print(f"kubeonnx render: {path}: {exc}", file=sys.stderr)
            errors += 1
    if args.namespace:
        for path, doc in docs:
            named = isinstance(doc, dict) and (doc.get("metadata") or {}).get("namespace")
            if named and named != args.namespace:
                print(
                    f"kubeonnx render: {path}: {doc.get('kind')} {doc['metadata'].get('name')} "
                    f"is in namespace {named!r}, not {args.namespace!r} (-n)",
                    file=sys.stderr,
                )
                errors += 1
    out, problems = render_documents(
        docs, config, pod_monitor=args.pod_monitor, namespace=args.namespace or "default"
    )
    for problem in problems:
        print(f"kubeonnx render: {problem}", file=sys.stderr)
    errors += len(problems)
    if out:
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 1 if errors else 0
