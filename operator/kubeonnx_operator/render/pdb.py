"""The PodDisruptionBudget: voluntary evictions take one replica at a time."""

from __future__ import annotations

from typing import Any

from .model import Model


def render_pdb(model: Model) -> dict[str, Any]:
    # maxUnavailable, not minAvailable: a model scaled down to one replica must still let
    # a node drain go on.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": model.metadata(),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": model.selector}},
    }
