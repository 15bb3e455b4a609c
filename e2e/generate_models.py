"""Generate the ONNX models the tests, benchmarks and demo use (no downloads).

    python -m e2e.generate_models DIR     # writes DIR/<name>.onnx and prints their paths

Models:
  mlp      tiny MLP, FP32 [-1,4] -> [-1,3], dynamic batch: server overhead dominates
  fixed    the same MLP with a fixed batch of 2: runs request by request
  mixed    several inputs and outputs of mixed types: FP32, INT64, BOOL and STRING
  wide     a 4-layer 1024-wide MLP, FP32 [-1,256] -> [-1,10] (~9.5 MB): about 0.2 ms a run
           alone, about 60 us a row in batches of 32; model and server cost about the same
  convnet  a small image classifier, FP32 [-1,3,32,32] -> [-1,10] (~1.5 MB): four 3x3
           convolutions, about 1.2 ms a row whatever the batch; compute dominates
  centered x - mean(x over the rows), FP32 [-1,4] -> [-1,4]: dynamic first dimension, but
           each answer depends on every row of the request, so it must never be batched
  lookup   an embedding table, INT64 ids [-1,2] -> FP32 [-1,2,3]: an id outside 0..9 fails
           the run (Gather), which poisons any batch it is merged into
  valid    a 3x3 convolution without padding, FP32 [1,1,H,W] with dynamic H and W: a
           warm-up on 1x1 cannot run it
  text     a tiny text classifier, INT64 input_ids and attention_mask [-1,-1] -> FP32
           logits [-1,2]: the mean of the embeddings (vocabulary 0..99) of the tokens the
           mask keeps, so padding (mask 0) changes nothing; for token budgets
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kubeonnx-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _dense_layers(sizes: list[int], batch: int | str, seed: int, name: str) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["output" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, sizes[-1]])],
        initializer=inits,
    )
    return _model(graph)


def convnet_model() -> onnx.ModelProto:
    """Conv-ReLU blocks (3->32->64, pool, ->128, pool, ->256), global pooling, a dense head."""
    rng = np.random.default_rng(3)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "input"
    for i, (c_in, c_out, pool) in enumerate(
        [(3, 32, False), (32, 64, True), (64, 128, True), (128, 256, False)]
    ):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(c_in * 9)).astype(np.float32)
        b = np.zeros(c_out, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"k{i}"), numpy_helper.from_array(b, f"kb{i}")]
        nodes.append(
            helper.make_node("Conv", [current, f"k{i}", f"kb{i}"], [f"c{i}"], pads=[1, 1, 1, 1])
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        current = f"r{i}"
        if pool:
            nodes.append(
                helper.make_node(
                    "MaxPool", [current], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            current = f"p{i}"
    w = (rng.standard_normal((256, 10)) / 16).astype(np.float32)
    inits += [
        numpy_helper.from_array(w, "head"),
        numpy_helper.from_array(np.zeros(10, dtype=np.float32), "head_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head", "head_b"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return _model(graph)


def detector_model() -> onnx.ModelProto:
    """A tiny object detector on [3,32,32]: a 4x4 grid of 16x16 anchors (8 pixels apart, so
    neighbours overlap), box offsets and 3 class scores from the image. Outputs boxes
    [batch, 16, 4] (x1, y1, x2, y2 in input pixels) and scores [batch, 16, 3] (sigmoid)."""
    rng = np.random.default_rng(5)
    centers = [((gx + 0.5) * 8, (gy + 0.5) * 8) for gy in range(4) for gx in range(4)]
    anchors = np.array([[x - 8, y - 8, x + 8, y + 8] for x, y in centers], dtype=np.float32)
    inits = [
        numpy_helper.from_array((rng.standard_normal((3, 3, 1, 1)) * 4).astype(np.float32), "wc"),
        numpy_helper.from_array(np.array([-0.5, 0.0, 0.5], np.float32), "bc"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "wr"),
        numpy_helper.from_array(np.zeros(4, np.float32), "br"),
        numpy_helper.from_array(np.array([0, 3, 16], np.int64), "cls_shape"),
        numpy_helper.from_array(np.array([0, 4, 16], np.int64), "reg_shape"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(anchors, "anchors"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "wc", "bc"], ["cls"]),
        helper.make_node("Reshape", ["cls", "cls_shape"], ["cls_flat"]),
        helper.make_node("Transpose", ["cls_flat"], ["cls_t"], perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["cls_t"], ["scores"]),
        helper.make_node("Conv", ["pooled", "wr", "br"], ["reg"]),
        helper.make_node("Reshape", ["reg", "reg_shape"], ["reg_flat"]),
        helper.make_node("Transpose", ["reg_flat"], ["reg_t"], perm=[0, 2, 1]),
        helper.make_node("Tanh", ["reg_t"], ["reg_tanh"]),
        helper.make_node("Mul", ["reg_tanh", "four"], ["offsets"]),
        helper.make_node("Add", ["offsets", "anchors"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 16, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 16, 3]),
        ],
        initializer=inits,
    )
    return _model(graph)


def mixed_model() -> onnx.ModelProto:
    b = "batch"
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["features", "axes"], ["score"], keepdims=1),
        helper.make_node("Add", ["ids", "one"], ["ids_plus_one"]),
        helper.make_node("Not", ["mask"], ["mask_not"]),
        helper.make_node("Identity", ["tag"], ["tag_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [b, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [b, 2]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [b, 2]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, [b, 1]),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [b, 1]),
            helper.make_tensor_value_info("ids_plus_one", TensorProto.INT64, [b, 2]),
            helper.make_tensor_value_info("mask_not", TensorProto.BOOL, [b, 2]),
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, [b, 1]),
        ],
        initializer=[one, axes],
    )
    return _model(graph)


def centered_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["input", "mean"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "centered",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    return _model(graph)


def lookup_model() -> onnx.ModelProto:
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["output"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2, 3])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return _model(graph)


def valid_conv_model() -> onnx.ModelProto:
    kernel = np.full((1, 1, 3, 3), 1 / 9, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "kernel"], ["output"])],
        "valid",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "oh", "ow"])],
        initializer=[numpy_helper.from_array(kernel, "kernel")],
    )
    return _model(graph)


def text_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((100, 4)).astype(np.float32)
    weights = rng.standard_normal((4, 2)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["embedded", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "seq"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=inits,
    )
    return _model(graph)


MODELS = {
    "mlp": lambda: _dense_layers([4, 16, 3], "batch", 1, "mlp"),
    "fixed": lambda: _dense_layers([4, 16, 3], 2, 1, "fixed"),
    "mixed": mixed_model,
    "wide": lambda: _dense_layers([256, 1024, 1024, 1024, 10], "batch", 2, "wide"),
    "convnet": convnet_model,
    "detector": detector_model,
    "centered": centered_model,
    "lookup": lookup_model,
    "valid": valid_conv_model,
    "text": text_model,
}


def generate(directory: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write the named models (all by default) into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names or list(MODELS):
        path = directory / f"{name}.onnx"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(MODELS[name]().SerializeToString())
            tmp.replace(path)
        paths[name] = path
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    for name, path in generate(out, sys.argv[2:] or None).items():
        print(f"{name}\t{path}")
