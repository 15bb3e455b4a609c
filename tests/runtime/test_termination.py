"""Each fatal start-up of `kubeonnx serve` that test_startup.py and test_images.py do not
start a process for: the real process exits non-zero and writes its one line to the
termination log, which the operator shows as ModelLoadFailed.

Not here: "CUDA execution provider failed to initialise" needs onnxruntime's CUDA build
(this one has no CUDA provider, see test_startup's "no CUDA execution provider"); a
download interrupted RETRIES times and a bucket that answers without credentials need
faults moto does not make.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from tests.runtime.test_startup import run_to_failure

IMAGE_32 = {"input": {"image": {"size": [32, 32]}}}


def sequence_model(path: Path) -> Path:
    """A model whose output is a sequence of tensors, which the protocol cannot carry."""
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["input"], ["output"])],
        "sequence",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_value_info(
                "output",
                helper.make_sequence_type_proto(
                    helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", 4])
                ),
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


# (model: a generated model's name or a callable writing one, environment, the message)
CASES: list[tuple[str | Callable[[Path], Path], dict[str, str], str]] = [
    (
        "mlp",
        {"KUBEONNX_PROCESSING": "{not json"},
        "invalid processing (KUBEONNX_PROCESSING): ",
    ),
    (
        "convnet",
        {"KUBEONNX_PROCESSING": json.dumps(IMAGE_32), "KUBEONNX_LABELS_FILE": "/nonexistent/l"},
        "cannot read the labels file /nonexistent/l: ",
    ),
    (
        "convnet",
        {"KUBEONNX_PROCESSING": json.dumps(IMAGE_32), "KUBEONNX_LABELS_FILE": "{labels}"},
        "the labels file has 2 labels and model output 'output' has 10 classes",
    ),
    (
        "lookup",
        {"KUBEONNX_PROCESSING": json.dumps(IMAGE_32)},
        "image processing feeds FP32; model input 'ids' takes INT64",
    ),
    (
        "mixed",
        {"KUBEONNX_PROCESSING": json.dumps(IMAGE_32)},
        "the model has 4 inputs; spec.processing.input.image.input must name the one that "
        "takes the image",
    ),
    (
        "convnet",
        {"KUBEONNX_PROCESSING": json.dumps({"input": {"image": {"size": [32, 32], "input": "x"}}})},
        "spec.processing.input.image.input 'x' is not a model input; the model's are input",
    ),
    (
        "detector",
        {
            "KUBEONNX_PROCESSING": json.dumps(
                {**IMAGE_32, "output": {"classification": {"output": "boxes"}}}
            )
        },
        "model output 'boxes' has shape [-1, 16, 4]; classification takes [batch, classes]",
    ),
    (
        "detector",
        {
            "KUBEONNX_PROCESSING": json.dumps(
                {**IMAGE_32, "output": {"detection": {"boxes": "scores", "scores": "boxes"}}}
            )
        },
        "model output 'scores' has shape [-1, 16, 3]; detection boxes are [batch, boxes, 4]",
    ),
    (
        "mlp",
        {"KUBEONNX_QUOTA_CONFIG": "/nonexistent/quota.json"},
        "cannot read the quota configuration /nonexistent/quota.json: ",
    ),
    (
        "mlp",
        {"KUBEONNX_QUOTA_CONFIG": "{quota_bad}"},
        "invalid quota configuration ",
    ),
    (
        "mlp",
        {"KUBEONNX_QUOTA_CONFIG": "{quota_ledger}", "KUBEONNX_LEDGER_DSN": ""},
        "the quota policy's ledger needs KUBEONNX_LEDGER_DSN, which is not set",
    ),
    (
        "mlp",
        {"KUBEONNX_ROLE": "gateway"},
        "role gateway takes asynchronous requests only, and no queue is set "
        "(KUBEONNX_ASYNC_REDIS_URL)",
    ),
    (
        sequence_model,
        {},
        "model tensor 'output' has type seq(tensor(float)), which the runtime cannot serve",
    ),
]


@pytest.mark.parametrize(
    ("model", "env", "expected"),
    CASES,
    ids=[case[2].split(":")[0][:48] for case in CASES],
)
def test_the_fatal_start_up_is_one_line_in_the_termination_log(
    models: dict[str, Path],
    tmp_path: Path,
    model: str | Callable[[Path], Path],
    env: dict[str, str],
    expected: str,
) -> None:
    files = {
        "labels": tmp_path / "labels.txt",
        "quota_bad": tmp_path / "quota-bad.json",
        "quota_ledger": tmp_path / "quota-ledger.json",
    }
    files["labels"].write_text("cat\ndog\n")
    files["quota_bad"].write_text(
        json.dumps({"policy": "p", "namespace": "t", "tenants": [{"name": ""}]})
    )
    files["quota_ledger"].write_text(
        json.dumps({"policy": "p", "namespace": "t", "ledger": {"dsnEnv": "KUBEONNX_LEDGER_DSN"}})
    )
    placeholders = {f"{{{name}}}": str(file) for name, file in files.items()}
    env = {k: placeholders.get(v, v) for k, v in env.items()}
    path = model(tmp_path / "model.onnx") if callable(model) else models[model]
    served = run_to_failure(tmp_path, "--model-uri", f"file://{path}", env=env)
    message = served.termination_log.read_text()
    assert message.startswith(expected), served.logs()
    assert message.count("\n") == 1 and message.endswith("\n")
