"""Small models built on the spot for tests and benchmarks (nothing is downloaded).

Why here and not in tests/: the benchmark harness builds the same models, and a TorchScript
or ONNX file is a build output that must never be committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LINEAR_W = np.array([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], dtype=np.float32)
LINEAR_B = np.array([0.5, -0.5], dtype=np.float32)


def linear_reference(x: np.ndarray, version: int = 1) -> np.ndarray:
    return (x @ LINEAR_W + LINEAR_B) * version


def build_torch_linear(path: Path, version: int = 1) -> Path:
    """TorchScript: OUTPUT__0 = (INPUT__0 @ W + b) * version."""
    import torch

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(LINEAR_W.copy()), requires_grad=False)
            self.b = torch.nn.Parameter(torch.from_numpy(LINEAR_B.copy()), requires_grad=False)
            self.scale = float(version)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.w + self.b) * self.scale

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Linear()).save(str(path))
    return path


def build_seed_model(path: Path) -> Path:
    """TorchScript: logits = one_hot(upper-case(input_ids), 256) * attention_mask."""
    import torch

    class Upper(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            lower = (input_ids >= 97) & (input_ids <= 122)
            ids = torch.where(lower, input_ids - 32, input_ids)
            logits = torch.nn.functional.one_hot(ids, 256).to(torch.float32)
            return logits * attention_mask.unsqueeze(-1).to(torch.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Upper()).save(str(path))
    return path


def build_onnx_add(path: Path) -> Path:
    """ONNX: SUM = A + B, PRODUCT = A * B over [batch, 4] float32."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", 4])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["batch", 4])
    p = helper.make_tensor_value_info("PRODUCT", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["A", "B"], ["SUM"]),
            helper.make_node("Mul", ["A", "B"], ["PRODUCT"]),
        ],
        "add_mul",
        [a, b],
        [s, p],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_onnx_mlp(path: Path, width: int = 256, hidden: int = 1024, seed: int = 0) -> Path:
    """ONNX: OUTPUT = relu(INPUT @ W1 + b1) @ W2 + b2 over [batch, width] float32 (benchmarks)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((width, hidden)) * 0.05).astype(np.float32), "W1"
        ),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "B1"),
        numpy_helper.from_array(
            (rng.standard_normal((hidden, width)) * 0.05).astype(np.float32), "W2"
        ),
        numpy_helper.from_array(np.zeros(width, np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["INPUT", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["OUTPUT"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
