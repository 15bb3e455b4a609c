"""The peers benchmark's answer check (benchmarks/peers_bench.py), against the real `kubeonnx
serve`: a server whose answers are onnxruntime's passes, in both protocols; one whose answers
are another model's, or that refuses the request, is named with what went wrong, so it is
never timed."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

from e2e.generate_models import _dense_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peers_bench import check_answers

KINDS = ["v2-json", "v2-binary"]


def _url(served) -> str:  # type: ignore[no-untyped-def]
    return f"{served.url}/v2/models/mlp/infer"


@pytest.mark.parametrize("kind", KINDS)
def test_right_answers_pass(mlp_server, models: dict[str, Path], kind: str) -> None:  # type: ignore[no-untyped-def]
    assert check_answers(_url(mlp_server), kind, models["mlp"], (4,)) == ""


@pytest.mark.parametrize("kind", KINDS)
def test_another_models_answers_are_named(mlp_server, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    # The same shapes as the served mlp, other weights: every row's answer differs.
    other = tmp_path / "other.onnx"
    onnx.save(_dense_layers([4, 16, 3], "batch", 99, "mlp"), str(other))
    problem = check_answers(_url(mlp_server), kind, other, (4,))
    assert problem.startswith("row 0: got ["), problem


def test_a_refused_request_is_named(mlp_server, models: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    # BentoML's and LitServe's body ({"input": [[...]]}) is not a v2 request.
    problem = check_answers(_url(mlp_server), "own-json", models["mlp"], (4,))
    assert problem.startswith("ValueError: status 4"), problem
