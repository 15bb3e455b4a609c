"""The `kubeonnx` command as a user first meets it: --version, help without pydantic's
metavars, secrets never taken as flags, help on every flag, `render -n`, no termination log
unless asked, and `kubeonnx infer` against the real server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from kubeonnx_runtime import cli as serve_cli
from kubeonnx_runtime.client import endpoint
from kubeonnx_runtime.settings import ServeSettings
from pydantic import ValidationError

from e2e.generate_images import generate as generate_images
from tests.runtime.conftest import KUBEONNX, Served
from tests.runtime.test_images import LABELS, PROCESSING, image_server

EXAMPLE = """\
apiVersion: kubeonnx.io/v1alpha1
kind: InferenceModel
metadata: {name: iris}
spec:
  model: {uri: s3://models/iris/model.onnx}
"""


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    done = subprocess.run(
        [KUBEONNX, *args], input=stdin, capture_output=True, text=True, timeout=120, env=env
    )
    return done.returncode, done.stdout, done.stderr


def options_without_help(help_text: str) -> list[str]:
    """The options of an argparse help text whose description is empty."""
    section = help_text.split("options:", 1)[1]
    lines = section.splitlines()
    bare = []
    for i, line in enumerate(lines):
        match = re.match(r"^  (-[-\w]+(?:, --[-\w]+)?(?: \S+)?)(\s{2,}\S.*)?$", line)
        if not match:
            continue
        described = match.group(2) or (
            i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and lines[i + 1].strip()
        )
        if not described:
            bare.append(match.group(1))
    return bare


def test_version_prints_the_installed_version() -> None:
    code, out, _ = run("--version")
    assert code == 0
    assert out.strip() == f"kubeonnx {version('kubeonnx')}"


def test_serve_help_has_no_pydantic_metavars_and_no_password_flag() -> None:
    code, out, _ = run("serve", "--help")
    assert code == 0
    assert "null" not in out and "{str," not in out and "SecretStr" not in out, out
    assert not re.search(r"--async-redis-password(?!-file)", out), out
    assert "--async-redis-password-file" in out
    # the router's mirror secret: the variable or a file only
    assert not re.search(r"--mirror-secret(?!-file)", out), out
    assert "KUBEONNX_MODEL_URI" in out  # the variable behind each flag is named
    assert options_without_help(out) == []


@pytest.mark.parametrize(
    ("flag", "variable"),
    [
        ("--async-redis-password", "KUBEONNX_ASYNC_REDIS_PASSWORD"),
        ("--mirror-secret", "KUBEONNX_MIRROR_SECRET"),
    ],
)
def test_a_password_on_the_command_line_is_refused_naming_the_variable(
    flag: str, variable: str
) -> None:
    code, _, err = run("serve", "--model-uri", "file:///m.onnx", f"{flag}=hunter2")
    assert code == 2
    assert variable in err and "hunter2" not in err


@pytest.mark.parametrize(
    ("flag", "instead"),
    [
        ("--async-redis-url", "KUBEONNX_ASYNC_REDIS_PASSWORD"),
        ("--s3-endpoint", "AWS_SECRET_ACCESS_KEY"),
        ("--model-uri", "AWS_SECRET_ACCESS_KEY"),
    ],
)
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_url_flag_carrying_credentials_is_refused_in_one_line(
    flag: str, instead: str, form: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Secrets are never flags, in a URL either: the password would be in `ps`."""
    import kubeonnx_runtime.server as server

    started: list[ServeSettings] = []
    monkeypatch.setattr(server, "serve", lambda settings: started.append(settings) or 0)
    url = {
        "--async-redis-url": "redis://:hunter2@127.0.0.1:1/0",
        "--s3-endpoint": "http://key:hunter2@127.0.0.1:9000",
        "--model-uri": "s3://key:hunter2@models/m.onnx",
    }[flag]
    given = [f"{flag}={url}"] if form == "equals" else [flag, url]
    argv = (["--model-uri", "file:///m.onnx"] if flag != "--model-uri" else []) + given
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert started == []
    assert len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err
    assert f"{flag} must not carry credentials" in err and instead in err, err
    assert "KUBEONNX_" + flag[2:].replace("-", "_").upper() in err


def test_a_redis_url_with_its_password_in_the_variable_or_the_password_variable_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubeonnx_runtime.server as server

    started: list[ServeSettings] = []
    monkeypatch.setattr(server, "serve", lambda settings: started.append(settings) or 0)
    monkeypatch.setenv("KUBEONNX_ASYNC_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    assert serve_cli.main(["--model-uri", "file:///m.onnx"]) == 0
    assert started[-1].async_redis_url == "redis://:hunter2@127.0.0.1:1/0"
    monkeypatch.delenv("KUBEONNX_ASYNC_REDIS_URL")
    monkeypatch.setenv("KUBEONNX_ASYNC_REDIS_PASSWORD", "hunter2")
    argv = ["--model-uri", "file:///m.onnx", "--async-redis-url", "redis://127.0.0.1:1/0"]
    assert serve_cli.main(argv) == 0
    password = started[-1].async_redis_password
    assert password is not None and password.get_secret_value() == "hunter2"


@pytest.mark.parametrize("content", [None, "current-context: x\n"])
def test_operator_without_a_readable_kubeconfig_exits_in_one_line(
    tmp_path: Path, content: str | None
) -> None:
    """Not in a pod and KUBECONFIG missing or unusable: one line naming the file and a
    non-zero exit, not kopf's login retried every minute."""
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(kubeconfig), HOME=str(tmp_path))
    code, _, err = run("operator", env=env)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert f"cannot read the kubeconfig {kubeconfig}" in err, err
    assert "Traceback" not in err


def test_the_redis_password_is_read_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    settings = ServeSettings(
        _cli_parse_args=[
            "--model-uri",
            "file:///m.onnx",
            "--async-redis-password-file",
            str(secret),
        ]
    )
    assert settings.async_redis_password is not None
    assert settings.async_redis_password.get_secret_value() == "hunter2"


def test_usage_describes_every_flag_and_refuses_a_password_in_its_dsn() -> None:
    code, out, _ = run("usage", "--help")
    assert code == 0
    assert options_without_help(out) == [], out
    code, _, err = run("usage", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert code == 2
    assert "must not hold a password" in err and "KUBEONNX_LEDGER_DSN" in err


def test_render_takes_the_namespace_of_documents_that_name_none(tmp_path: Path) -> None:
    code, out, err = run("render", "-n", "team-a", "-f", "-", stdin=EXAMPLE)
    assert code == 0, err
    children = list(yaml.safe_load_all(out))
    assert children and {c["metadata"]["namespace"] for c in children} == {"team-a"}
    other = EXAMPLE.replace("metadata: {name: iris}", "metadata: {name: iris, namespace: b}")
    code, _, err = run("render", "-n", "team-a", "-f", "-", stdin=other)
    assert code == 1
    assert "namespace 'b', not 'team-a'" in err


def test_serve_by_hand_writes_no_termination_log(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[object] = []
    monkeypatch.delenv("KUBEONNX_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(serve_cli, "write_termination_message", lambda p, m: written.append(p))
    assert serve_cli.main(["--model-uri", "file:///m.onnx", "--log-level", "loud"]) == 2
    assert written in ([], [None])
    assert ServeSettings(model_uri="file:///m.onnx").termination_log is None


@pytest.mark.parametrize(
    ("url", "action", "expected"),
    [
        ("http://h:8080", "infer", "http://h:8080/v2/models/model/infer"),
        ("http://h/team/iris/", "infer", "http://h/team/iris/v2/models/model/infer"),
        ("http://h/v2/models/iris", "infer", "http://h/v2/models/iris/infer"),
        (
            "http://h/v2/models/iris/versions/2",
            "predict",
            "http://h/v2/models/iris/versions/2/predict",
        ),
        ("http://h/v2/models/iris/infer", "infer", "http://h/v2/models/iris/infer"),
    ],
)
def test_infer_finds_the_endpoint_from_any_url_a_user_has(
    url: str, action: str, expected: str
) -> None:
    assert endpoint(url, "model", action) == expected


def test_infer_sends_a_npy_and_prints_the_outputs(mlp_server: Served, tmp_path: Path) -> None:
    array = tmp_path / "rows.npy"
    np.save(array, np.arange(8, dtype=np.float32).reshape(2, 4))
    code, out, err = run("infer", mlp_server.url, str(array), "--model", "mlp")
    assert code == 0, err
    assert "model mlp version 1" in out
    assert re.search(r"FP32 \[2, 3\]", out), out


def test_infer_into_a_closed_pipe_ends_quietly(mlp_server: Served, tmp_path: Path) -> None:
    """`kubeonnx infer URL rows.npy | head -2`: head closes the pipe; a BrokenPipeError
    traceback used to follow. Here the pipe is closed before anything is written."""
    array = tmp_path / "rows.npy"
    np.save(array, np.arange(8, dtype=np.float32).reshape(2, 4))
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [KUBEONNX, "infer", mlp_server.url, str(array), "--model", "mlp"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)
    assert done.stderr == "", done.stderr
    assert done.returncode == 128 + signal.SIGPIPE


def test_infer_sends_a_json_request_as_it_is(mlp_server: Served, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ]
            }
        )
    )
    code, out, err = run("infer", f"{mlp_server.url}/v2/models/mlp", str(request), "--raw")
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["shape"] == [1, 3]


def test_infer_prints_the_servers_message_and_fails(mlp_server: Served, tmp_path: Path) -> None:
    array = tmp_path / "wrong.npy"
    np.save(array, np.zeros((2, 5), dtype=np.float32))
    code, out, err = run("infer", mlp_server.url, str(array), "--model", "mlp")
    assert code == 1 and out == ""
    assert "HTTP 400" in err and "shape" in err, err
    code, _, err = run("infer", mlp_server.url, str(tmp_path / "absent.npy"), "--model", "mlp")
    assert code == 1 and "absent.npy" in err
    code, _, err = run("infer", mlp_server.url, str(array), "--model", "nosuch")
    assert code == 1 and "HTTP 404" in err


@pytest.fixture(scope="module")
def classifier(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[Served]:
    yield from image_server(tmp_path_factory, models["convnet"], "classifier", PROCESSING, LABELS)


def test_infer_sends_an_image_to_predict(classifier: Served, tmp_path: Path) -> None:
    photo = generate_images(tmp_path)["photo.jpg"]
    code, out, err = run("infer", classifier.url, str(photo), "--model", "classifier")
    assert code == 0, err
    answer = json.loads(out)
    assert {p["label"] for p in answer["predictions"]} <= set(LABELS), answer


@pytest.mark.parametrize("suffix", [".bmp", ".gif", ".tif", ".tiff"])
def test_infer_refuses_images_the_server_does_not_decode(suffix: str, tmp_path: Path) -> None:
    """The runtime decodes JPEG, PNG and WebP only: other images are refused before any
    request (the URL below answers nothing), and help names only those three."""
    picture = tmp_path / f"photo{suffix}"
    picture.write_bytes(b"not sent")
    code, out, err = run("infer", "http://127.0.0.1:1", str(picture))
    assert code == 1 and out == ""
    assert "JPEG, PNG and WebP images only" in err, err
    assert "Connection refused" not in err
    code, out, _ = run("infer", "--help")
    assert code == 0
    assert not re.search(r"\.(bmp|gif|tiff?)\b", out), out
    assert ".webp" in out


def test_infer_takes_a_url_without_scheme_and_never_prints_credentials(
    mlp_server: Served, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, np.ones((1, 4), np.float32))
    bare = mlp_server.url.removeprefix("http://")  # 127.0.0.1:PORT
    code, out, err = run("infer", bare, str(rows), "--model", "mlp")
    assert code == 0, err
    assert "model mlp version 1" in out
    code, _, err = run("infer", f"ftp://{bare}", str(rows))
    assert code == 1 and "URL must start with http:// or https://" in err, err
    code, _, err = run("infer", "http://user:hunter2@nosuch.invalid:8080", str(rows))
    assert code == 1 and "hunter2" not in err and "user:" not in err, err
    assert "must not carry credentials" in err and "-H @FILE" in err, err


def test_infer_sends_headers_so_a_tenant_is_not_only_the_default(
    serve, models: dict[str, Path], tmp_path: Path
) -> None:
    """A model under a QuotaPolicy without a default tenant refuses a request without an
    API key (401); -H 'X-Api-Key: KEY' and -H @FILE (the key out of the command line) send
    the tenant's key."""
    from kubeonnx_runtime.quota import key_hash

    policy = {
        "policy": "team",
        "namespace": "tests",
        "tenants": [{"name": "acme", "keySha256": [key_hash("acme-key")]}],
    }
    config = tmp_path / "quota.json"
    config.write_text(json.dumps(policy))
    served = serve(
        "--model-uri",
        f"file://{models['mlp']}",
        env={"KUBEONNX_QUOTA_CONFIG": str(config)},
    )
    rows = tmp_path / "rows.npy"
    np.save(rows, np.ones((1, 4), np.float32))
    code, _, err = run("infer", served.url, str(rows), "--input", "input")
    assert code == 1 and "HTTP 401" in err, err
    code, out, err = run("infer", served.url, str(rows), "-H", "X-Api-Key: acme-key")
    assert code == 0, err
    assert "model model version 1" in out
    keyfile = tmp_path / "headers"
    keyfile.write_text("# acme's key\nX-Api-Key: acme-key\n")
    code, out, err = run("infer", served.url, str(rows), "--header", f"@{keyfile}")
    assert code == 0, err
    code, _, err = run("infer", served.url, str(rows), "-H", "X-Api-Key acme-key")
    assert code == 1 and "not a header 'Name: value'" in err and "acme-key" not in err, err
    code, _, err = run("infer", served.url, str(rows), "-H", "X-Api-Key: wrong")
    assert code == 1 and "HTTP 401" in err, err


def test_the_operators_deployments_ask_for_the_termination_log() -> None:
    # serve writes none unless asked: the pods the operator renders must ask.
    from kubeonnx_operator.cli import render_documents
    from kubeonnx_operator.config import OperatorConfig

    spec = {
        "model": {"uri": "s3://models/m.onnx"},
        "async": {"enabled": True, "redis": {"url": "redis://r:6379"}},
    }
    doc = {"kind": "InferenceModel", "metadata": {"name": "m"}, "spec": spec}
    children, problems = render_documents([("-", doc)], OperatorConfig())
    assert problems == []
    deployments = [c for c in children if c["kind"] == "Deployment"]
    assert len(deployments) == 2  # the model and its gateway
    for deployment in deployments:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["KUBEONNX_TERMINATION_LOG"] == "/dev/termination-log"
        assert container.get("terminationMessagePath", "/dev/termination-log") == (
            "/dev/termination-log"
        )


def test_the_mirror_secret_is_read_from_a_file(tmp_path: Path) -> None:
    from kubeonnx_runtime.settings import ServeSettings

    secret = tmp_path / "mirror"
    secret.write_text("s3cret\n")
    settings = ServeSettings(_cli_parse_args=["--mirror-secret-file", str(secret)])
    assert settings.mirror_secret is not None
    assert settings.mirror_secret.get_secret_value() == "s3cret"


def test_a_runtime_started_alone_is_asked_as_the_readme_does(
    serve, models: dict[str, Path], tmp_path: Path
) -> None:
    """README (Calling a model): a runtime started without --model-name serves its model as
    `model`, and `kubeonnx infer URL rows.npy` (no --model) reaches it; the quickstart's
    `mlp` takes FP32 [-1,4] named `input` and answers FP32 [-1,3]."""
    served = serve("--model-uri", f"file://{models['mlp']}")
    meta = httpx.get(f"{served.url}/v2/models/model").json()
    assert meta["name"] == "model"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [(o["datatype"], o["shape"]) for o in meta["outputs"]] == [("FP32", [-1, 3])]
    rows = tmp_path / "rows.npy"
    np.save(rows, np.ones((2, 4), np.float32))
    code, out, err = run("infer", served.url, str(rows))
    assert code == 0, err
    assert "model model version 1" in out and re.search(r"FP32 \[2, 3\]", out), out


def test_every_serve_flag_is_also_its_variable_and_the_help_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README (Calling a model): every flag is also a KUBEONNX_* variable, and `kubeonnx
    serve --help` names each. For every setting, a value the flag takes (other than the
    default) set as the variable gives the same setting."""
    code, out, _ = run("serve", "--help")
    assert code == 0
    options = out.split("options:", 1)[1]
    flags = sorted(set(re.findall(r"^  (--[a-z0-9-]+)", options, re.M)) - {"--help"})
    for flag in flags:
        variable = "KUBEONNX_" + flag[2:].replace("-", "_").upper()
        named = options.split(f"\n  {flag} ", 1)[1].split("\n  -", 1)[0]
        assert f"[env: {variable}]" in " ".join(named.split()), flag
    secrets = {f[2:].replace("-", "_") for f in serve_cli.SECRET_FLAGS}
    fields = set(ServeSettings.model_fields) - secrets  # secrets are never flags
    assert {f[2:].replace("-", "_") for f in flags} == fields

    existing = tmp_path / "file"
    existing.write_text("x")
    candidates = ["7", "0.25", "30", "123456789", "a" * 64, "abc", str(existing), "/p"]
    candidates += ["cuda", "gateway", "debug"]
    unchecked = set(fields)
    for name in sorted(fields):
        default = ServeSettings.model_fields[name].default
        for value in candidates:
            flag = "--" + name.replace("_", "-")
            try:
                by_flag = getattr(ServeSettings(_cli_parse_args=[flag, value]), name)
            except (ValidationError, SystemExit):
                continue
            if by_flag == default:
                continue
            with monkeypatch.context() as env:
                env.setenv("KUBEONNX_" + name.upper(), value)
                by_variable = getattr(ServeSettings(_cli_parse_args=[]), name)
            assert by_variable == by_flag, (name, value)
            unchecked.discard(name)
            break
    assert unchecked == set()


def test_render_with_pod_monitor_adds_the_pod_monitor_the_readme_shows() -> None:
    """README (Serving a model): `kubeonnx render -f examples/gpu-keda.yaml -n vision
    --pod-monitor` shows what the operator would create, a PodMonitor included."""
    example = str(Path(__file__).resolve().parents[2] / "examples" / "gpu-keda.yaml")
    kinds = {}
    for extra in ((), ("--pod-monitor",)):
        code, out, err = run("render", "-f", example, "-n", "vision", *extra)
        assert code == 0, err
        docs = list(yaml.safe_load_all(out))
        assert {d["metadata"]["namespace"] for d in docs} == {"vision"}
        kinds[extra] = sorted(d["kind"] for d in docs)
    assert "PodMonitor" not in kinds[()]
    assert kinds[("--pod-monitor",)] == sorted([*kinds[()], "PodMonitor"])
    assert {"Deployment", "Service", "ScaledObject", "Ingress"} <= set(kinds[()])
