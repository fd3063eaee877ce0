"""Run a declared segmentation version on a volume: the declaration's steps, the network, labels on the source grid.

    segmenter = DeclaredSegmenter.load(version)          # the weights verified by the registry first
    labels = segmenter.segment(voxels, affine)           # uint8, the shape of ``voxels``

``voxels`` are indexed (i, j, k) and ``affine`` maps those indices to RAS millimetres. The steps are
the declaration's, in a fixed order: orientation, resampling, intensity, crop, padding, inference,
activation and discretisation, padding and crop undone, back to the source grid (nearest
neighbour), then the clean-up of components (measured in the source grid's millimetres).
Everything is numpy/scipy; torch is imported only to run a TorchScript network.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.declared.geometry import Grid
from models.declared.schema import Crop, Declaration, Inference, IntensityStep, Pad, Postprocessing

log = logging.getLogger("inference.models.declared")

#: A network: a float32 batch (N, C, *spatial) in, its output channels (N, K, *spatial) out.
Network = Callable[[np.ndarray], np.ndarray]


class DeclarationError(ValueError):
    """The declaration and the network or the volume do not fit (e.g. the network returns another shape)."""


def load_network(path: Path, framework: str, threads: int | None = None) -> Network:
    """The network in ``path``: ONNX through ONNX Runtime on the CPU, TorchScript through torch."""
    if framework == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0], np.float32)

        return run_onnx
    if framework == "torchscript":
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's notice that TorchScript has a successor
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_torchscript(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out: Any = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
                if isinstance(out, (list, tuple)):  # deep supervision: the first output is the prediction
                    out = out[0]
                return out.float().numpy()

        return run_torchscript
    raise DeclarationError(f"framework {framework!r}: only onnx and torchscript are run")


@dataclass
class DeclaredSegmenter:
    """A declared version's network with its declaration, and the label values its structures use."""

    declaration: Declaration
    network: Network
    labels: tuple[int, ...]

    @classmethod
    def load(cls, version: Any, threads: int | None = None) -> DeclaredSegmenter:
        """The segmenter of a registry ``ModelVersion`` of a declared family (its weights already verified)."""
        if version.declaration is None:
            raise DeclarationError(f"{version.family} {version.version} has no usable declaration: {version.problem}")
        network = load_network(version.weights, version.declaration.framework, threads)
        return cls(version.declaration, network, tuple(s.label for s in version.structures))

    def segment(self, voxels: np.ndarray, affine: np.ndarray, voxel_volume_mm3: float | None = None) -> np.ndarray:
        """Labels (uint8, the shape of ``voxels``): 0 background, else a structure's label value."""
        if voxels.ndim != 3:
            raise DeclarationError(f"a volume has three axes, got shape {voxels.shape}")
        pre = self.declaration.preprocessing
        grid = Grid.plan(voxels.shape, affine, pre.orientation, pre.spacing_mm)
        x = apply_intensity(grid.to_network(voxels), pre.intensity)
        box = crop_box(x, pre.crop)
        x = x[box]
        pad = pad_widths(x.shape, pre.pad, self.declaration.inference)
        x = apply_pad(x, pad, pre.pad)
        output = infer(self.network, x, self.declaration.inference)
        output = output[(slice(None), *(slice(before, n - after) for (before, after), n
                                        in zip(pad, output.shape[1:], strict=True)))]  # the padding undone
        labels = discretize(output, self.declaration.postprocessing, self.labels)
        full = np.zeros(grid.shape, np.uint8)
        full[box] = labels
        labels = grid.to_source(full)
        volume_mm3 = voxel_volume_mm3 if voxel_volume_mm3 is not None else float(abs(np.linalg.det(affine[:3, :3])))
        return clean_components(labels, self.declaration.postprocessing, self.labels, volume_mm3)


def apply_intensity(x: np.ndarray, steps: Sequence[IntensityStep]) -> np.ndarray:
    """The declared intensity steps in order (float32)."""
    x = np.asarray(x, np.float32)
    for step in steps:
        if step.kind == "window":
            x = _rescale(x, step.source, step.to, step.clip)
        elif step.kind == "percentiles":
            low, high = np.percentile(x, step.source)
            if step.to is None:
                x = np.clip(x, low, high) if step.clip else x
            else:
                x = _rescale(x, (float(low), float(high)), step.to, step.clip)
        elif step.kind == "minmax":
            x = _rescale(x, (float(x.min()), float(x.max())), step.to, False)
        elif step.kind == "zscore":
            mask = x != 0 if step.nonzero else None
            values = x[mask] if mask is not None else x
            if values.size:
                mean, std = float(values.mean()), float(values.std())
                std = std if std > 1e-6 else 1.0
                if mask is None:
                    x = (x - np.float32(mean)) / np.float32(std)
                else:
                    x = np.where(mask, (x - np.float32(mean)) / np.float32(std), np.float32(0))
        x = np.asarray(x, np.float32)
    return x


def _rescale(x: np.ndarray, source: Any, to: Any, clip: bool) -> np.ndarray:
    low, high = source
    if high - low < 1e-12:  # a constant volume: everything to the bottom of the range
        return np.full_like(x, to[0])
    out = (x - np.float32(low)) / np.float32(high - low) * np.float32(to[1] - to[0]) + np.float32(to[0])
    return np.clip(out, to[0], to[1]) if clip else out


def crop_box(x: np.ndarray, crop: Crop | None) -> tuple[slice, slice, slice]:
    """The region the network sees: all of ``x``, its foreground's bounding box plus margin, or a fixed box."""
    full = tuple(slice(0, n) for n in x.shape)
    if crop is None:
        return full  # type: ignore[return-value]
    if crop.kind == "box":
        box = tuple(slice(min(s, n), min(s + k, n)) for s, k, n in zip(crop.start, crop.size, x.shape, strict=True))
        if any(b.stop <= b.start for b in box):
            raise DeclarationError(f"the declared crop box (start {list(crop.start)}, size {list(crop.size)}) lies "
                                   f"outside the prepared volume {list(x.shape)}")
        return box  # type: ignore[return-value]
    found = np.argwhere(x > crop.above)
    if not found.size:
        return full  # type: ignore[return-value]
    low, high = found.min(axis=0), found.max(axis=0) + 1
    return tuple(slice(max(0, int(a) - m), min(n, int(b) + m))  # type: ignore[return-value]
                 for a, b, m, n in zip(low, high, crop.margin, x.shape, strict=True))


def pad_widths(shape: tuple[int, ...], pad: Pad | None, inference: Inference) -> list[tuple[int, int]]:
    """(before, after) per axis: to the declared multiple and minimum, and at least one sliding-window patch."""
    multiple = pad.multiple if pad is not None else (1, 1, 1)
    minimum = list(pad.minimum if pad is not None else (0, 0, 0))
    if inference.mode == "sliding_window":
        minimum = [max(m, p) for m, p in zip(minimum, inference.patch, strict=True)]
    out = []
    for axis, (n, k, m) in enumerate(zip(shape, multiple, minimum, strict=True)):
        if inference.mode == "slices" and axis == inference.axis:
            k, m = 1, 0  # slices are taken one by one along this axis: it is never padded
        target = max(m, int(math.ceil(n / k)) * k)
        out.append(((target - n) // 2, target - n - (target - n) // 2))
    return out


def apply_pad(x: np.ndarray, widths: list[tuple[int, int]], pad: Pad | None) -> np.ndarray:
    if not any(any(w) for w in widths):
        return x
    if pad is not None and pad.mode == "edge":
        return np.pad(x, widths, mode="edge")
    return np.pad(x, widths, mode="constant", constant_values=pad.value if pad is not None else 0.0)


def infer(network: Network, x: np.ndarray, inference: Inference) -> np.ndarray:
    """The network's output channels (K, *x.shape) for the prepared volume ``x``."""
    if inference.mode == "whole":
        out = _checked(network(x[None, None]), 1, x.shape)
        return out[0]
    if inference.mode == "slices":
        return _by_slices(network, x, inference)
    return _sliding_window(network, x, inference)


def _checked(out: np.ndarray, batch: int, spatial: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(out, np.float32)
    if out.ndim != 2 + len(spatial) or out.shape[0] != batch or tuple(out.shape[2:]) != tuple(spatial):
        raise DeclarationError(f"the network returned {tuple(out.shape)} for an input of batch {batch} and size "
                               f"{tuple(spatial)}; it must return (batch, channels, *size): check the declared "
                               "inference mode, patch and padding")
    return out


def _by_slices(network: Network, x: np.ndarray, inference: Inference) -> np.ndarray:
    v = np.moveaxis(x, inference.axis, 0)
    n, c = v.shape[0], inference.context
    index = np.arange(n)[:, None] + np.arange(-c, c + 1)[None, :]
    if inference.edge == "replicate":
        stacks = v[np.clip(index, 0, n - 1)]
    else:
        padded = np.concatenate([np.zeros((c, *v.shape[1:]), v.dtype), v, np.zeros((c, *v.shape[1:]), v.dtype)])
        stacks = padded[index + c]
    outputs = []
    for start in range(0, n, inference.batch):
        batch = np.ascontiguousarray(stacks[start:start + inference.batch])
        outputs.append(_checked(network(batch), batch.shape[0], v.shape[1:]))
    out = np.moveaxis(np.concatenate(outputs), 1, 0)  # (K, n, A, B)
    return np.moveaxis(out, 1, inference.axis + 1)


def _starts(n: int, patch: int, overlap: float) -> list[int]:
    stride = max(1, int(patch * (1 - overlap)))
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts


def _importance(patch: tuple[int, ...], blend: str, sigma_scale: float) -> np.ndarray:
    if blend == "constant":
        return np.ones(patch, np.float32)
    weights = np.ones(patch, np.float32)
    for axis, p in enumerate(patch):
        centre, sigma = (p - 1) / 2, max(sigma_scale * p, 1e-3)
        profile = np.exp(-0.5 * ((np.arange(p) - centre) / sigma) ** 2).astype(np.float32)
        shape = [1] * len(patch)
        shape[axis] = p
        weights = weights * profile.reshape(shape)
    weights /= weights.max()
    return np.maximum(weights, max(float(weights[weights > 0].min()), 1e-6))


def _sliding_window(network: Network, x: np.ndarray, inference: Inference) -> np.ndarray:
    patch = inference.patch
    weights = _importance(patch, inference.blend, inference.sigma_scale)
    corners = [(a, b, c) for a in _starts(x.shape[0], patch[0], inference.overlap)
               for b in _starts(x.shape[1], patch[1], inference.overlap)
               for c in _starts(x.shape[2], patch[2], inference.overlap)]
    total: np.ndarray | None = None
    count = np.zeros(x.shape, np.float32)
    for start in range(0, len(corners), inference.batch):
        chunk = corners[start:start + inference.batch]
        windows = [tuple(slice(s, s + p) for s, p in zip(corner, patch, strict=True)) for corner in chunk]
        batch = np.stack([x[w] for w in windows])[:, None]
        out = _checked(network(batch), len(chunk), patch)
        if total is None:
            total = np.zeros((out.shape[1], *x.shape), np.float32)
        for window, prediction in zip(windows, out, strict=True):
            total[(slice(None), *window)] += prediction * weights
            count[window] += weights
    assert total is not None  # at least one window: the volume was padded to a patch at least
    return total / count


def discretize(output: np.ndarray, post: Postprocessing, labels: Sequence[int]) -> np.ndarray:
    """Labels (uint8) from the network's channels: activation, then argmax or thresholds; unknown labels are 0."""
    if post.activation == "softmax":
        shifted = np.exp(output - output.max(axis=0, keepdims=True))
        output = shifted / shifted.sum(axis=0, keepdims=True)
    elif post.activation == "sigmoid":
        output = 1.0 / (1.0 + np.exp(-output))
    if post.threshold is None:
        result = np.argmax(output, axis=0)
    else:
        result = np.zeros(output.shape[1:], np.int64)
        for channel in range(output.shape[0]):
            result[output[channel] > post.threshold] = channel + 1
    known = np.zeros(max(int(result.max()), max(labels, default=0)) + 1, np.uint8)
    for label in labels:
        known[label] = label
    return known[result]


def clean_components(labels: np.ndarray, post: Postprocessing, values: Sequence[int],
                     voxel_volume_mm3: float) -> np.ndarray:
    """Per label: keep its largest connected component, drop components under the declared volume."""
    if not post.largest_component and post.min_component_mm3 <= 0:
        return labels
    connectivity = np.ones((3, 3, 3), bool)
    out = labels.copy()
    min_voxels = post.min_component_mm3 / voxel_volume_mm3 if voxel_volume_mm3 > 0 else 0
    for value in values:
        components, count = ndimage.label(labels == value, structure=connectivity)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = sizes >= min_voxels
        if post.largest_component:
            keep &= np.arange(sizes.size) == int(np.argmax(sizes))
        keep[0] = False
        out[(labels == value) & ~keep[components]] = 0
    return out
