"""`helm install` says what to do next: the chart's NOTES.txt renders, names the release's
operator, the Secret keys the runtime reads, a first model and where its status is.

The pinned helm renders NOTES only on `helm install`, which needs a cluster even with
`--dry-run=client`; so the test renders the same text as a template of a copy of the chart
(`helm template --show-only`), with the same values and release."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeonnx"


def render_notes(tmp_path: Path, *args: str) -> str:
    found = sorted(glob.glob(os.path.expanduser("~/.cache/kubeonnx/bin/helm-*/helm")))
    if not found:
        pytest.skip("the pinned helm is not built (bash e2e/build-binaries.sh)")
    chart = tmp_path / "kubeonnx"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n"
    )
    (chart / "templates" / "notes.yaml").write_text(
        'notes: |\n{{ include "test.notes" . | indent 2 }}\n'
    )
    done = subprocess.run(
        [
            found[-1],
            "template",
            "ko",
            str(chart),
            "-n",
            "ops",
            "--show-only",
            "templates/notes.yaml",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text: str = yaml.safe_load(done.stdout)["notes"]
    return text


def test_notes_say_what_to_do_next(tmp_path: Path) -> None:
    text = render_notes(tmp_path)
    assert "release ko in namespace ops" in text
    assert "kubectl -n ops rollout status deployment/ko" in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert "kubectl -n demo wait --for=condition=Ready im/NAME" in text
    assert "kubectl get inferencemodels -A -o wide" in text
    assert "URL/infer" in text
    # the default images are in no registry: the notes say so and how to point at yours
    assert "no registry holds the chart's default images" in text
    assert "defaults: image.repository, runtime.image, runtime.gpuImage." in text
    assert "helm upgrade ko CHART -n ops -f my-values.yaml" in text


def test_notes_warn_about_each_image_left_at_its_default(tmp_path: Path) -> None:
    """An upgrade with --set alone puts the chart's defaults back: the operator's image as
    well as the runtime's is named while it is a default, and only then."""
    text = render_notes(tmp_path, "--set", "runtime.image=registry.example.com/r:1")
    assert "registry.example.com/r:1" in text
    assert "defaults: image.repository, runtime.gpuImage." in text
    text = render_notes(tmp_path / "op", "--set", "image.repository=registry.example.com/op")
    assert "registry.example.com/op:0.1.0" in text
    assert "defaults: runtime.image, runtime.gpuImage." in text


def test_notes_do_not_warn_when_every_image_is_yours(tmp_path: Path) -> None:
    values = tmp_path / "my-values.yaml"
    values.write_text(
        "image: {repository: registry.example.com/op, tag: '1'}\n"
        "runtime: {image: registry.example.com/r:1, gpuImage: registry.example.com/r:1-cuda}\n"
    )
    text = render_notes(tmp_path, "-f", str(values))
    assert "registry.example.com/op:1" in text and "registry.example.com/r:1-cuda" in text
    assert "WARNING" not in text and "no registry holds" not in text


def test_the_chart_ships_notes() -> None:
    assert (CHART / "templates" / "NOTES.txt").is_file()
