"""The README's commands work as written.

Every shell block of the README is either run here (in a scratch folder with the
repository's examples and chart and a generated model), or marked as needing what the test
bed lacks (its first line a comment `# needs ...`). Every block, run or not, is checked: each
curl URL against the runtime's real routes and methods, each `kubeonnx` subcommand and flag
against the CLI's help, each `helm --set` against the chart's values, each repository file
it names against the tree.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import numpy as np
import yaml
from kubeonnx_runtime.app import create_app
from kubeonnx_runtime.batching import Batcher
from kubeonnx_runtime.dataplane import DataPlane
from kubeonnx_runtime.datatypes import TensorSpec
from kubeonnx_runtime.metrics import RuntimeMetrics
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from tests.operator.helm import pinned_helm

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARK = "# needs"
HOSTS = ("http://127.0.0.1:8080", "http://localhost:8080")
KUBEONNX = [sys.executable, "-c", "import sys, kubeonnx_cli; sys.exit(kubeonnx_cli.main())"]


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", path.read_text(), re.M | re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, continuations joined, heredoc bodies left out."""
    lines: list[str] = []
    heredoc: str | None = None
    pending = ""
    for raw in block.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        found = re.search(r"<<-?\s*'?(\w+)'?", line)
        if found:
            heredoc = found.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def words(line: str) -> list[str]:
    return shlex.split(line.split(" #")[0], posix=True)


class Model:
    inputs = [TensorSpec("input", "FP32", (-1, 4))]
    outputs = [TensorSpec("output", "FP32", (-1, 3))]
    output_names = ["output"]
    device = "cpu"

    def check_outputs(self, names: list[str]) -> None:
        pass

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("not called")


@cache
def routes() -> list[tuple[re.Pattern[str], frozenset[str]]]:
    model = Model()
    batcher = Batcher(model.run, max_batch_size=1, max_delay_s=0, max_queue=4, batchable=True)
    door = create_app(
        DataPlane(model, batcher, name="m", version="1"), RuntimeMetrics(CollectorRegistry())
    )
    found = []
    for route in door.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route) and route.methods:
            pattern = re.sub(r"\{[^}]+\}", "[^/]+", route.path)
            found.append((re.compile(f"^{pattern}$"), frozenset(route.methods)))
    return found


def curl_calls(block: str) -> list[tuple[str, str]]:
    """(method, path) of each curl in the block, the path as the runtime sees it."""
    calls = []
    for line in commands(block):
        argv = words(line)
        if not argv or argv[0] != "curl":
            continue
        urls = [a for a in argv if a.startswith(("$URL", "$GATEWAY", "http"))]
        assert len(urls) == 1, f"curl with no URL the test knows: {line}"
        url = urls[0]
        assert ".." not in url, f"curl rewrites '..' away: {line}"
        if url.startswith("$URL"):  # the URL column: the model's base
            path = "/v2/models/m" + url[len("$URL") :]
        elif url.startswith("$GATEWAY"):
            path = url[len("$GATEWAY") :]
        else:
            assert url.startswith(HOSTS), f"curl to an unknown host: {line}"
            path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        path = re.sub(r"[A-Z][A-Z_]*\b", "x", path)  # NAME, ID
        post = any(a in argv for a in ("-d", "--data", "--data-binary", "-F", "--form"))
        calls.append(("POST" if post else "GET", path))
    return calls


@cache
def cli_help(command: str) -> str:
    done = subprocess.run([*KUBEONNX, command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, f"kubeonnx {command} --help: {done.stderr}"
    return done.stdout


def check_kubeonnx(block: str) -> None:
    for line in commands(block):
        argv = words(line)
        if not argv or argv[0] != "kubeonnx":
            continue
        if argv[1:] == ["--version"]:
            continue
        assert argv[1] in {"serve", "infer", "operator", "render", "usage"}, line
        text = cli_help(argv[1])
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("-")):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), (
                f"kubeonnx {argv[1]} has no flag {flag}: {line}"
            )


def check_helm_sets(block: str) -> None:
    values = yaml.safe_load((ROOT / "charts/kubeonnx/values.yaml").read_text())
    for line in commands(block):
        argv = words(line)
        for i, arg in enumerate(argv[:-1]):
            if arg == "--set":
                node = values
                for part in argv[i + 1].split("=")[0].split("."):
                    assert isinstance(node, dict) and part in node, f"no value {arg}: {line}"
                    node = node[part]


def check_files(block: str) -> None:
    for line in commands(block):
        for word in words(line):
            if word.startswith(("examples/", "charts/", "e2e/", "crds/")):
                assert (ROOT / word).exists(), f"no such file {word}: {line}"


def test_every_block_is_run_or_marked_and_checked() -> None:
    blocks = shell_blocks(README)
    assert len(blocks) >= 10
    run = [b for b in blocks if not b.startswith(MARK)]
    assert run, "no block of the README runs here"
    for block in blocks:
        check_kubeonnx(block)
        check_helm_sets(block)
        check_files(block)
        for method, path in curl_calls(block):
            matched = [methods for pattern, methods in routes() if pattern.match(path)]
            assert matched, f"no route {path} (from the README's curl {method})"
            assert any(method in m for m in matched), f"{path} does not take {method}"


def test_every_helm_install_and_upgrade_takes_the_values_file() -> None:
    """`helm upgrade` with --set alone resets every value, images included, to the chart's
    defaults (which no registry holds): every install and upgrade the docs show gives the
    quickstart's values file, which a block writes."""
    docs = [README, *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for doc in docs for b in shell_blocks(doc)]
    found = 0
    for block in blocks:
        for line in commands(block):
            argv = words(line)
            if argv[:2] in (["helm", "install"], ["helm", "upgrade"]):
                found += 1
                assert "-f" in argv and argv[argv.index("-f") + 1] == "my-values.yaml", line
    assert found >= 3
    assert any("cat > my-values.yaml" in b for b in shell_blocks(README))


def test_the_docs_curls_reach_real_routes() -> None:
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for block in shell_blocks(doc):
            for method, path in curl_calls(block):
                ok = any(p.match(path) and method in m for p, m in routes())
                assert ok, f"{doc.name}: curl {method} {path} matches no route"


def test_the_url_column_alone_takes_no_post() -> None:
    """Why the README says POST goes to $URL/infer: the model's base answers only GET."""
    base = [m for p, m in routes() if p.match("/v2/models/m")]
    assert base and not any("POST" in m for m in base)
    bad = curl_calls("curl -s $URL -d '{}'\n")
    assert not any(p.match(bad[0][1]) and "POST" in m for p, m in routes())


def helm() -> str:
    """The pinned helm (e2e/versions.env), not whichever helm-* is in the cache."""
    return str(pinned_helm())


def test_the_blocks_that_can_run_here_run(tmp_path: Path) -> None:
    from e2e.generate_models import generate

    for name in ("examples", "charts", "crds"):
        (tmp_path / name).symlink_to(ROOT / name)
    generate(tmp_path / "models", ["mlp"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubeonnx").write_text(f'#!/bin/sh\nexec {shlex.join(KUBEONNX)} "$@"\n')
    (bin_dir / "kubeonnx").chmod(0o755)
    (bin_dir / "helm").symlink_to(helm())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REGISTRY": "registry.example.com/you",  # step 2's
    }
    ran = 0
    for block in shell_blocks(README):
        if block.startswith(MARK):
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr}"
        ran += 1
    assert ran >= 3
    # step 3's values file names every image, each a value the chart has
    chart_values = yaml.safe_load((ROOT / "charts/kubeonnx/values.yaml").read_text())
    mine = yaml.safe_load((tmp_path / "my-values.yaml").read_text())
    images = [mine["image"]["repository"], mine["runtime"]["image"], mine["runtime"]["gpuImage"]]
    assert all(i.startswith("registry.example.com/you/") for i in images), mine
    for section, keys in mine.items():
        assert set(keys) <= set(chart_values[section]), (section, keys)
    # the model the quickstart writes is valid under the CRD's schema, not only the operator's
    crd = yaml.safe_load((ROOT / "crds/inferencemodels.kubeonnx.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    model = yaml.safe_load((tmp_path / "mlp.yaml").read_text())
    jsonschema.validate(model, schema)
    assert (
        model["spec"]["model"]["sha256"]
        == __import__("hashlib").sha256((tmp_path / "models/mlp.onnx").read_bytes()).hexdigest()
    )


def test_the_docs_objects_fit_the_crds() -> None:
    """Every InferenceModel and QuotaPolicy written out in the README or docs/ is valid
    under its CRD's schema (what `kubectl apply` checks before CEL)."""
    schemas = {}
    for crd_file in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.safe_load(crd_file.read_text())
        schemas[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"][
            "openAPIV3Schema"
        ]
    checked = 0
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"^```yaml\n(.*?)^```", doc.read_text(), re.M | re.S):
            for obj in yaml.safe_load_all(block):
                if isinstance(obj, dict) and obj.get("kind") in schemas:
                    jsonschema.validate(obj, schemas[obj["kind"]])
                    checked += 1
    assert checked >= 2


def test_the_get_im_sample_is_what_kubectl_prints() -> None:
    """The README's `kubectl get im` sample: the CRD's printer columns (those shown without
    -o wide), aligned as kubectl aligns them, and blank where the model has no value (the
    server's table prints no `<none>`): a model with no candidate has no CANARY nor PHASE."""
    crd = yaml.safe_load((ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml").read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    shown = [c["name"].upper() for c in served["additionalPrinterColumns"] if not c.get("priority")]
    text = README.read_text()
    header = next(line for line in text.splitlines() if line.startswith("# NAME      READY"))
    row = text.splitlines()[text.splitlines().index(header) + 1]
    assert header[2:].split() == ["NAME", *shown], header
    starts = [(header + " ").index(f" {name} ") + 1 for name in shown]
    assert "<none>" not in row, row
    cells = dict(
        zip(
            shown,
            (row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)),
            strict=True,
        )
    )
    assert cells["CANARY"] == "" and cells["PHASE"] == "", cells
    # kubectl pads each column to its widest cell and three spaces.
    for name, start, end in zip(shown, starts, [*starts[1:], None], strict=True):
        if end is not None:
            width = max(len(name), len(cells[name]))
            assert end - start == width + 3, (name, header, row)
