"""The pinned helm (e2e/versions.env's HELM_VERSION, built by e2e/build-binaries.sh), for the
tests that run it. Not built: those tests skip, except in CI (CI=true), where a skip would
pass silently and they fail instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pinned_version() -> str:
    versions = dict(
        line.split("=", 1)
        for line in (ROOT / "e2e" / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return versions["HELM_VERSION"].strip()


def pinned_helm() -> Path:
    cache = Path(os.environ.get("KUBEONNX_CACHE", Path.home() / ".cache" / "kubeonnx"))
    helm = cache / "bin" / f"helm-{pinned_version()}" / "helm"
    if not helm.exists():
        why = f"{helm} is not built yet (bash e2e/build-binaries.sh, or make binaries)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return helm
