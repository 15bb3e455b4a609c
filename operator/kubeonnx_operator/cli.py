"""`kubeonnx operator` and `kubeonnx render`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import OperatorConfig, load_config
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

    import kopf

    from .handlers import build_registry

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        registry=build_registry(config),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )
    return 0


def _documents(path: str) -> list[Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


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
    parser.add_argument("--config", help="operator config YAML")
    args = parser.parse_args(argv)
    config = _config(args.config)

    out: list[dict[str, Any]] = []
    errors = 0
    for path in args.filename:
        try:
            docs = _documents(path)
        except (OSError, yaml.YAMLError) as exc:
            print(f"kubeonnx render: {path}: {exc}", file=sys.stderr)
            errors += 1
            continue
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != "InferenceModel":
                continue
            meta = doc.get("metadata") or {}
            name, namespace = meta.get("name"), meta.get("namespace") or "default"
            where = f"{path}: InferenceModel {namespace}/{name}"
            if not name:
                print(
                    f"kubeonnx render: {path}: an InferenceModel has no metadata.name",
                    file=sys.stderr,
                )
                errors += 1
                continue
            try:
                model = load_model(name, namespace, doc.get("spec"), config)
            except InvalidSpec as exc:
                print(f"kubeonnx render: {where}: {exc}", file=sys.stderr)
                errors += 1
                continue
            out.extend(render_children(model, config))
    if out:
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 1 if errors else 0
