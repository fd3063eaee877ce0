"""Fast forward passes for inference: ONNX Runtime on the CPU, PyTorch on a GPU.

A runner takes a batch of network inputs (float32 numpy) and returns the softmax class
probabilities (float32 numpy, classes on axis 1).  Both kinds run the network with its batch
norms folded into the convolutions (``models.unet.fold_batch_norm``).  The ONNX graph is
exported from the loaded PyTorch weights, so no second weights file is shipped and the two can
never disagree about which weights they run; with a cache folder the exported graph is kept
there, named by the weights file's SHA-256 and checked against its own SHA-256 when read
again: loading the ensemble then takes 0.6 s instead of 2.4 s (bench/README.md).  On this project's 2-core CPU
(bench/README.md, "Hippocampus model speed") the ensemble ran 1.7x (1 thread, CPU time) to
3x (2 threads) faster than before, with identical labels on the test split.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .unet import UNet, fold_batch_norm

#: "auto": ONNX Runtime for 2D networks on the CPU when it is installed, else PyTorch.
BACKENDS = ("auto", "onnxruntime", "torch")

Runner = Callable[[np.ndarray], np.ndarray]
#: Part of every cached graph's name: bump it when ``export_onnx`` changes the graph it writes.
EXPORT_FORMAT = 1

log = logging.getLogger("inference.models")


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

    def __init__(self, model: UNet, threads: int | None = None, cache_dir: Path | None = None,
                 cache_key: str | None = None) -> None:
        import onnxruntime as ort

        self.graph = cached_export(model, cache_dir, cache_key)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: with several sessions (the members of an ensemble, a server's other
        # threads) the idle threads' spinning took the cores from the next member, whose runs doubled in time
        # (issue 28: two members 72-76 ms -> 40-41 ms, the 1.0 ensemble -10 %; one member unchanged)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def cached_export(model: UNet, cache_dir: Path | None, key: str | None) -> bytes:
    """``export_onnx(model)``, kept in ``cache_dir`` under ``key`` (e.g. weights SHA-256 + member) when both are given.

    The file name also holds ``EXPORT_FORMAT`` and the torch version (the exporter); a sidecar
    ``.sha256`` file holds the graph's hash and is checked at every read, so a damaged or
    half-written graph is exported again rather than run. A cache that cannot be written only
    costs the export next time.
    """
    if cache_dir is None or key is None:
        return export_onnx(model)
    path = Path(cache_dir) / f"{key}-export{EXPORT_FORMAT}-torch{torch.__version__.replace('+', '_')}.onnx"
    digest_path = path.with_name(path.name + ".sha256")
    try:
        graph = path.read_bytes()
        if hashlib.sha256(graph).hexdigest() == digest_path.read_text(encoding="ascii").strip():
            return graph
        log.warning("cached ONNX graph %s does not match its SHA-256: exporting it again", path)
    except OSError:
        pass  # not cached yet
    graph = export_onnx(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(path, graph)
        _replace_atomically(digest_path, hashlib.sha256(graph).hexdigest().encode("ascii"))
    except OSError as exc:
        log.warning("cannot cache the ONNX graph in %s (%s): it will be exported again at the next load",
                    path.parent, exc.strerror or exc)
    return graph


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it (readers never see half a file)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def make_runner(model: UNet, device: str | torch.device = "cpu", backend: str = "auto",
                threads: int | None = None, cache_dir: Path | None = None,
                cache_key: str | None = None) -> TorchRunner | OnnxRunner:
    """The runner for one network: ``backend`` is one of ``BACKENDS``; ``threads`` applies to ONNX Runtime.

    ``cache_dir`` and ``cache_key`` keep the exported ONNX graph between loads (``cached_export``).
    """
    if chosen_backend(model, device, backend) == "onnxruntime":
        return OnnxRunner(model, threads, cache_dir, cache_key)
    return TorchRunner(model, device)


def chosen_backend(model: UNet, device: str | torch.device = "cpu", backend: str = "auto") -> str:
    """What ``make_runner`` runs ``model`` with: ``"onnxruntime"`` or ``"torch"`` (``"auto"``: ONNX Runtime for
    2D networks on the CPU when installed); a ValueError for an unknown backend or ONNX Runtime off the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        return "onnxruntime" if on_cpu and model.dims == 2 and onnxruntime_available() else "torch"
    if backend == "onnxruntime" and not on_cpu:
        raise ValueError(f"the onnxruntime backend runs on the CPU only (device {device}); use backend 'torch'")
    return backend
