"""Fast forward passes for inference: ONNX Runtime on the CPU, PyTorch on a GPU.

A runner takes a batch of network inputs (float32 numpy) and returns the softmax class
probabilities (float32 numpy, classes on axis 1).  Both kinds run the network with its batch
norms folded into the convolutions (``models.unet.fold_batch_norm``).  The ONNX graph is
exported in memory from the loaded PyTorch weights every time a segmenter loads, so no second
weights file exists and the two can never disagree about which weights they run.  On this project's 2-core CPU
(bench/README.md, "Hippocampus model speed") the ensemble ran 1.7x (1 thread, CPU time) to
3x (2 threads) faster than before, with identical labels on the test split.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from .unet import UNet, fold_batch_norm

#: "auto": ONNX Runtime for 2D networks on the CPU when it is installed, else PyTorch.
BACKENDS = ("auto", "onnxruntime", "torch")

Runner = Callable[[np.ndarray], np.ndarray]


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (which PyTorch's exporter needs) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRunner:
    """The folded network in PyTorch on any device (the path used on CUDA)."""

    backend = "torch"

    def __init__(self, model: UNet, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model = fold_batch_norm(model).to(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(x).to(self.device))
            return torch.softmax(logits.float(), dim=1).cpu().numpy()


class OnnxRunner:
    """The folded network with a softmax on top, exported to ONNX and run by ONNX Runtime on the CPU."""

    backend = "onnxruntime"

    def __init__(self, model: UNet, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.graph = export_onnx(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(model: UNet) -> bytes:
    """ONNX bytes of ``softmax(fold_batch_norm(model)(x))`` with dynamic batch and spatial sizes.

    Uses PyTorch's TorchScript-based exporter: it takes well under a second per network, where the
    newer ``torch.export`` one takes tens of seconds on this machine and needs ``onnxscript``.
    """
    net = nn.Sequential(fold_batch_norm(model), nn.Softmax(dim=1)).cpu()
    m = model.size_multiple
    example = torch.zeros((1, model.down[0][0].in_channels) + (2 * m,) * model.dims)
    spatial = {i + 2: f"s{i}" for i in range(model.dims)}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's notice about its successor
        torch.onnx.export(net, (example,), buf, input_names=["x"], output_names=["p"], dynamo=False,
                          dynamic_axes={"x": {0: "n", **spatial}, "p": {0: "n", **spatial}})
    return buf.getvalue()


def make_runner(model: UNet, device: str | torch.device = "cpu", backend: str = "auto",
                threads: int | None = None) -> TorchRunner | OnnxRunner:
    """The runner for one network: ``backend`` is one of ``BACKENDS``; ``threads`` applies to ONNX Runtime."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        backend = "onnxruntime" if on_cpu and model.dims == 2 and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if not on_cpu:
            raise ValueError(f"the onnxruntime backend runs on the CPU only (device {device}); use backend 'torch'")
        return OnnxRunner(model, threads)
    return TorchRunner(model, device)
