"""Rebuild a trainable network from an exported `model.onnx`, so that a run can continue
from what the repository holds (checkpoints stay out of git).

The exporter folds each batch norm that follows a conv into that conv, so the graph has
no separate BN for those layers. They are brought back as exact identities: the conv takes
the folded weights, and its batch norm is set so that it maps the conv's output onto
itself (plus the folded bias) at the statistics the conv's output has on real faces. The
rebuilt network computes what the ONNX model computes in eval mode, and its batch norms
see batch statistics close to their running ones when training resumes.

Initialisers are matched to modules in execution order (Conv -> Conv2d, Gemm/MatMul ->
Linear, PRelu -> PReLU) or by state-dict name (unfused batch norms, named Gemm weights),
and the result is checked against ONNX Runtime on the calibration faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

PARITY_TOLERANCE = 1e-3


class OnnxWeightsError(ValueError):
    """The ONNX graph does not fit the network it should be loaded into."""


def execution_order(model: nn.Module, sample: torch.Tensor,
                    kinds: tuple[type, ...]) -> list[nn.Module]:
    """Modules of the given kinds in the order a forward pass calls them."""
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: called.append(mod))
             for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def folded_batch_norms(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """Each Conv2d directly followed by a BatchNorm2d in the same Sequential."""
    pairs: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    for container in model.modules():
        if isinstance(container, nn.Sequential):
            children = list(container)
            for first, second in zip(children, children[1:], strict=False):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    pairs[first] = second
    return pairs


def _copy(target: torch.Tensor, value: np.ndarray, what: str) -> None:
    value = value.reshape(target.shape) if value.size == target.numel() else value
    if tuple(value.shape) != tuple(target.shape):
        raise OnnxWeightsError(f"{what}: ONNX shape {list(value.shape)} "
                               f"vs network {list(target.shape)}")
    with torch.no_grad():
        target.copy_(torch.from_numpy(np.array(value, dtype=np.float32, copy=True)))


def load_onnx_weights(model: nn.Module, onnx_path: Path, faces: np.ndarray) -> float:
    """Load `onnx_path`'s weights into `model` (built with the same options); `faces` are
    normalised NCHW float32 inputs used to calibrate folded batch norms and to check the
    result. Returns the largest logit difference from ONNX Runtime."""
    graph = onnx.load(str(onnx_path)).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    sample = torch.from_numpy(faces[:2])
    convs = execution_order(model, sample, (nn.Conv2d,))
    linears = execution_order(model, sample, (nn.Linear,))
    prelus = execution_order(model, sample, (nn.PReLU,))
    folded = folded_batch_norms(model)
    folded_bias: dict[nn.BatchNorm2d, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return weights[name]

    counters = {"Conv": 0, "Linear": 0, "PRelu": 0}
    for node in graph.node:
        params = [name for name in node.input if name in weights]
        if node.op_type == "Conv":
            if counters["Conv"] >= len(convs):
                raise OnnxWeightsError("the ONNX graph has more convolutions than the network")
            conv = convs[counters["Conv"]]
            counters["Conv"] += 1
            _copy(conv.weight, take(node.input[1]), f"conv {counters['Conv']} weight")
            bias = take(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if conv.bias is not None:
                _copy(conv.bias, bias if bias is not None else np.zeros(conv.out_channels),
                      "conv bias")
            elif conv in folded:
                folded_bias[folded[conv]] = (bias if bias is not None
                                             else np.zeros(conv.out_channels))
            elif bias is not None and np.any(bias):
                raise OnnxWeightsError("a conv without bias or batch norm has a bias in ONNX")
        elif node.op_type in ("Gemm", "MatMul") and len(params) >= 1 and node.input[1] in weights:
            if counters["Linear"] >= len(linears):
                raise OnnxWeightsError("the ONNX graph has more dense layers than the network")
            linear = linears[counters["Linear"]]
            counters["Linear"] += 1
            matrix = take(node.input[1])
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            _copy(linear.weight, matrix if trans_b else matrix.T, "dense weight")
            if linear.bias is not None and len(node.input) > 2 and node.input[2] in weights:
                _copy(linear.bias, take(node.input[2]), "dense bias")
        elif node.op_type == "PRelu":
            module = prelus[counters["PRelu"]]
            counters["PRelu"] += 1
            _copy(module.weight, take(node.input[1]), "PReLU slope")
    if counters["Conv"] != len(convs) or counters["Linear"] != len(linears) \
            or counters["PRelu"] != len(prelus):
        raise OnnxWeightsError(f"layer counts differ: ONNX {counters}, network "
                               f"{len(convs)} conv / {len(linears)} dense / {len(prelus)} PReLU")

    state = model.state_dict()
    for name, value in weights.items():
        if name in state and name not in used:
            _copy(state[name], value, name)
            used.add(name)

    _calibrate_folded(model, folded_bias, sample_faces=torch.from_numpy(faces))
    return _parity(model, onnx_path, faces)


def _calibrate_folded(model: nn.Module, folded_bias: dict[nn.BatchNorm2d, np.ndarray],
                      sample_faces: torch.Tensor) -> None:
    # First an exact identity (+ bias) at unit statistics, so the eval network equals the
    # ONNX one; then the statistics of each conv's output on real faces, kept identical.
    for bn, bias in folded_bias.items():
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    moments: dict[nn.BatchNorm2d, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [bn.register_forward_pre_hook(
        lambda mod, args: moments.__setitem__(
            mod, (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=False))))
        for bn in folded_bias]
    try:
        with torch.no_grad():
            model.eval()(sample_faces)
    finally:
        for hook in hooks:
            hook.remove()
    for bn, bias in folded_bias.items():
        mean, var = moments[bn]
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean + torch.from_numpy(bias.astype(np.float32)))


def _parity(model: nn.Module, onnx_path: Path, faces: np.ndarray) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: faces})
    with torch.no_grad():
        actual = model.eval()(torch.from_numpy(faces)).numpy()
    difference = float(np.abs(actual - expected).max())
    if difference > PARITY_TOLERANCE:
        raise OnnxWeightsError(f"rebuilt network differs from {onnx_path} by {difference:.2e}")
    return difference
