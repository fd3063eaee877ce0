"""Inference API for the hippocampus segmentation UNet.

Orientation contract
--------------------
``HippocampusSegmenter.segment`` expects a 3D array in exactly the axis
order and orientation that nibabel returns for the MSD Task04 NIfTI files
(``nib.load(path).get_fdata()``, shape about (35, 50, 35)).  With the
identity affine of that data set the axes are RAS: axis 0 = left->right,
axis 1 = posterior->anterior, axis 2 = inferior->superior.  The model slices
along the axis stored in each network's config (``config["axis"]``: 0 =
sagittal slices, 2 = axial slices) and treats the other two axes as the
image plane; a checkpoint may hold several networks (e.g. one per slicing
axis) whose probabilities are averaged, optionally with a left-right
(axis 0) mirrored pass.  Do not transpose or flip the array before calling it; a
flip along axis 1 would swap the anterior (1) and posterior (2) labels.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import PadCrop, context_slices, normalize, target_size
from .registry import file_sha256
from .runtime import Runner, chosen_backend, make_runner
from .unet import UNet, UNet2D, UNet3D

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "hippocampus_unet.pt"
MODEL_NAME = "hippocampus-unet-1.0"


def build_model(config: dict) -> UNet:
    """The untrained network a config describes (``arch`` "unet2.5d", the default, or "unet3d")."""
    if is_3d(config):
        return UNet3D(n_classes=int(config.get("n_classes", 3)), base=int(config["base"]),
                      depth=int(config["depth"]), dropout=float(config.get("dropout", 0.0)))
    return UNet2D(
        in_channels=2 * int(config["context"]) + 1,
        n_classes=int(config.get("n_classes", 3)),
        base=int(config["base"]),
        depth=int(config["depth"]),
        dropout=float(config.get("dropout", 0.0)),
    )


def is_3d(config: dict) -> bool:
    """Whether a network config describes the 3D UNet (else the 2.5D one)."""
    return config.get("arch", "unet2.5d") == "unet3d"


@torch.inference_mode()
def predict_probs(model: UNet, volume: np.ndarray, config: dict, device: str | torch.device = "cpu",
                  batch_size: int = 64) -> np.ndarray:
    """Class probabilities (n_classes, *volume.shape) for one volume (no TTA)."""
    if is_3d(config):
        return _predict_probs_3d(model, volume, config, device)
    axis, context, size = int(config["axis"]), int(config["context"]), int(config["size"])
    x = context_slices(normalize(volume), axis, context)  # (n, C, A, B)
    out_hw = target_size(x.shape[-2:], size, model.size_multiple)
    pc = PadCrop(tuple(x.shape[-2:]), out_hw)
    x = pc.apply(x, 0.0)
    probs = []
    for start in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
        probs.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy())
    p = pc.undo(np.concatenate(probs), 0.0)  # (n, K, A, B)
    p = np.moveaxis(p, 1, 0)  # (K, n, A, B): slice axis now first spatial axis
    return np.moveaxis(p, 1, axis + 1)


def _predict_probs_3d(model: UNet, volume: np.ndarray, config: dict, device: str | torch.device) -> np.ndarray:
    """One forward pass over the whole volume, centre-padded to the training shape (or a multiple above it)."""
    pc = PadCrop(volume.shape, target_size(volume.shape, tuple(config["shape"]), model.size_multiple))
    x = torch.from_numpy(pc.apply(normalize(volume), 0.0)[None, None]).to(device)
    p = torch.softmax(model(x).float(), dim=1)[0].cpu().numpy()
    return pc.undo(p, 0.0)


def predict_probs_tta(model: UNet, volume: np.ndarray, config: dict, device="cpu",
                      tta: bool | None = None) -> np.ndarray:
    """Probabilities, optionally averaged with those of the left-right (axis 0) mirror."""
    if tta is None:
        tta = bool(config.get("tta", False))
    p = predict_probs(model, volume, config, device)
    if tta:
        # Mirroring left<->right (axis 0) keeps anterior/posterior labels valid.
        p = 0.5 * (p + predict_probs(model, volume[::-1], config, device)[:, ::-1])
    return p


def predict_volume(model: UNet, volume: np.ndarray, config: dict, device="cpu",
                   tta: bool | None = None) -> np.ndarray:
    """uint8 label volume of a single network."""
    return np.argmax(predict_probs_tta(model, volume, config, device, tta), axis=0).astype(np.uint8)


def predict_ensemble(members: list[tuple[UNet, dict]], volume: np.ndarray, device="cpu") -> np.ndarray:
    """uint8 label volume from the mean class probabilities of several networks."""
    p = sum(predict_probs_tta(m, volume, cfg, device) for m, cfg in members) / len(members)
    return np.argmax(p, axis=0).astype(np.uint8)


#: How each slice is padded before a 2.5D network sees it: "fixed", the training size (64 x 64,
#: or the next multiple of 8 above a larger slice: what the networks were trained on), or
#: "tight", the next multiple of 8 (fewer FLOPs; labels may differ slightly, see MODEL_CARD.md).
CANVASES = ("fixed", "tight")


#: Pixels (slices x padded canvas) a 2.5D network takes in one batch: 128 slices of the 64 x 64 training canvas;
#: a larger slice means fewer slices per batch, so the network's own memory (each ONNX Runtime session keeps its
#: peak) is the same for any series (a 512 x 512 series sent 128 slices at once: 22.9 GB, issue 35).
BATCH_PIXELS = 128 * 64 * 64
#: Bytes a network's forward pass holds per batch pixel and per channel of its first level (``base``): its
#: activations, and what ONNX Runtime's arena keeps of them; from ``python -m bench.model_memory``.
ACTIVATION_BYTES_PER_PIXEL_PER_BASE = 48


def fast_member_probs(run: Runner, model: UNet, normalized: np.ndarray, config: dict, flip: bool,
                      max_batch: int | None = None, canvas: str = "fixed") -> np.ndarray:
    """Class probabilities (n_classes, *shape) of one 2.5D network, the mirrored pass batched in.

    Same result as ``predict_probs_tta`` (up to float rounding) with ``canvas="fixed"``, with the volume
    normalised once by the caller and every slice of both passes sent through ``run`` in batches of
    ``max_batch`` slices (default: ``BATCH_PIXELS`` worth of the padded canvas).
    """
    axis, context = int(config["axis"]), int(config["context"])
    size = int(config["size"]) if canvas == "fixed" else 0
    views = [normalized, normalized[::-1]] if flip else [normalized]
    stacks = [context_slices(v, axis, context) for v in views]  # each (n, C, A, B)
    pc = PadCrop(tuple(stacks[0].shape[-2:]), target_size(stacks[0].shape[-2:], size, model.size_multiple))
    x = np.concatenate([pc.apply(s, 0.0) for s in stacks])
    batch = max_batch or max(1, BATCH_PIXELS // math.prod(pc.out_shape))
    p = pc.undo(np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)]), 0.0)
    n = stacks[0].shape[0]
    passes = [np.moveaxis(np.moveaxis(p[k * n:(k + 1) * n], 1, 0), 1, axis + 1) for k in range(len(views))]
    if flip:
        return 0.5 * (passes[0] + passes[1][:, ::-1])
    return passes[0]


def load_network(state_dict: dict, config: dict, device: str) -> UNet:
    """One network from its ``state_dict`` and ``config``, in eval mode on ``device``."""
    model = build_model(config)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.to(device).eval()


class HippocampusSegmenter:
    """Segments hippocampus head/body (anterior, label 1) and tail (posterior, label 2).

    A checkpoint holds either one network (``state_dict`` + ``config``) or
    several (``members``: list of {``state_dict``, ``config``}, e.g. networks
    slicing along different axes) whose class probabilities are averaged.

    Inference settings let several model versions share one weights file: ``member_indices``
    (which networks of the checkpoint run) and ``flips`` (the left-right mirrored pass of each
    network whose config enables it).  ``segment`` runs the fast path (``models.runtime``:
    ONNX Runtime on the CPU, folded PyTorch on a GPU); ``segment_reference`` runs the plain
    PyTorch networks one slice batch at a time, as trained, for comparison.
    """

    version: str

    def __init__(self, model: UNet, config: dict, version: str, device: str,
                 split: dict | None = None, members: list[tuple[UNet, dict]] | None = None, *,
                 flips: bool = True, member_indices: tuple[int, ...] | None = None,
                 backend: str = "auto", threads: int | None = None, sha256: str | None = None,
                 canvas: str = "fixed", onnx_cache: str | os.PathLike | None = None) -> None:
        if canvas not in CANVASES:
            raise ValueError(f"canvas: unknown {canvas!r}; choose one of {', '.join(CANVASES)}")
        self.canvas = canvas
        self.split = split  # train/val/test case ids the weights were trained with, if stored
        self.model = model
        self.members = members if members else [(model, config)]
        self.member_indices = tuple(member_indices) if member_indices is not None else tuple(range(len(self.members)))
        self.flips = bool(flips)
        self.config = config
        self.version = version
        self.device = device
        self.sha256 = sha256  # of the weights file, when loaded from one
        # 3D networks (instance norm, nothing to fold) keep the reference path and get no runner
        # the exported graph of member i is cached under the weights' SHA-256 and i (when loaded from a file)
        cache = Path(onnx_cache) if onnx_cache is not None and sha256 else None
        # an ensemble's ONNX networks run side by side, one ONNX Runtime thread each: small networks use two
        # threads poorly (issue 28: the 1.0 ensemble 476 -> 428 ms on 2 cores, the same labels)
        total = max(1, threads or torch.get_num_threads())
        side_by_side = total > 1 and len(self.members) > 1 and all(
            not is_3d(cfg) and chosen_backend(m, device, backend) == "onnxruntime" for m, cfg in self.members)
        self.parallel_members = min(total, len(self.members)) if side_by_side else 1
        each = 1 if side_by_side else threads
        self.runners = [None if is_3d(cfg) else make_runner(m, device, backend, each, cache, f"{sha256}-member{i}")
                        for (m, cfg), i in zip(self.members, self.member_indices, strict=True)]
        self._pool: ThreadPoolExecutor | None = None  # made at first use (not before a server forks)
        self._pool_guard = threading.Lock()
        self.backend = ",".join(sorted({r.backend for r in self.runners if r is not None} or {"torch"}))

    @classmethod
    def load(cls, weights_path: str | os.PathLike | None = None, device: str | None = None, *,
             members: Sequence[int] | None = None, flips: bool = True, backend: str = "auto",
             threads: int | None = None, canvas: str = "fixed",
             onnx_cache: str | os.PathLike | None = None) -> HippocampusSegmenter:
        """Load a checkpoint (default: ``hippocampus_unet.pt`` next to this module).

        Args:
            device: ``"cuda"`` when available, else ``"cpu"``, unless given.
            members: indices of the checkpoint's networks to run (default: all of them).
            flips: run the left-right mirrored pass of networks whose config enables it
                (all four shipped ones); False runs each network once.
            backend: ``"auto"`` (ONNX Runtime on the CPU when installed, else PyTorch),
                ``"onnxruntime"`` or ``"torch"``.
            threads: CPU threads for inference (default ``torch.get_num_threads()``): an ensemble's ONNX
                networks run side by side on up to that many threads, one ONNX Runtime thread each; a
                single network gets them all.
            canvas: ``"fixed"`` (slices padded to the training size) or ``"tight"`` (to the next
                multiple of 8: fewer FLOPs, slightly different labels); see ``CANVASES``.
            onnx_cache: folder keeping the exported ONNX graphs between loads (named by the
                weights' SHA-256 and member index; ``models.runtime.cached_export``); None exports
                them at every load.

        ``version`` is ``"<name> (<first 12 hex digits of the file's SHA-256>)"``, followed by
        ``members=i,j``, ``flips=off`` and/or ``canvas=tight`` when those differ from the defaults.
        """
        path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = dict(ckpt["config"])
        stored = ckpt["members"] if "members" in ckpt else [{"state_dict": ckpt["state_dict"], "config": config}]
        indices = select_members(members, len(stored))
        chosen = [(load_network(stored[i]["state_dict"], dict(stored[i]["config"]), device), dict(stored[i]["config"]))
                  for i in indices]
        sha256 = file_sha256(path)
        version = (f"{ckpt.get('version', MODEL_NAME)} ({sha256[:12]})" +
                   settings_suffix(indices, len(stored), flips, canvas))
        return cls(chosen[0][0], config, version, device, ckpt.get("split"), chosen, flips=flips,
                   member_indices=indices, backend=backend, threads=threads, sha256=sha256, canvas=canvas,
                   onnx_cache=onnx_cache)

    def segment(self, volume: np.ndarray) -> np.ndarray:
        """Segment one 3D volume.

        Args:
            volume: 3D float or integer array in the raw nibabel axis order of
                the MSD Task04 NIfTI files (``img.get_fdata()``; RAS: axis 0
                left->right, axis 1 posterior->anterior, axis 2
                inferior->superior; 1 mm voxels, about 35 x 50 x 35).  Each
                2.5D network slices along its ``config["axis"]`` (see
                ``self.members``; 0 = sagittal, 2 = axial) with neighbouring
                slices as extra channels, a 3D network takes the whole
                volume; any size works (padded internally, then cropped back).

        Returns:
            uint8 array of the same shape: 0 background, 1 anterior, 2 posterior.
        """
        return np.argmax(self.probabilities(volume), axis=0).astype(np.uint8)

    def probabilities(self, volume: np.ndarray) -> np.ndarray:
        """Mean class probabilities (n_classes, *volume.shape) of the selected members (fast path)."""
        return mean_probabilities(self.member_probabilities(volume))

    def member_probabilities(self, volume: np.ndarray) -> list[np.ndarray]:
        """Each selected member's class probabilities (its mirrored pass averaged in), for their disagreement."""
        vol = _checked_volume(volume)
        normalized = normalize(vol)

        def member(index: int) -> np.ndarray:
            (model, cfg), run = self.members[index], self.runners[index]
            flip = self.flips and bool(cfg.get("tta", False))
            if run is None:
                return predict_probs_tta(model, vol, cfg, self.device, flip)
            return fast_member_probs(run, model, normalized, cfg, flip, canvas=self.canvas)

        if self.parallel_members == 1:
            return [member(i) for i in range(len(self.members))]
        pool, submitted = self._member_pool(), []
        for index in range(len(self.members)):
            try:
                submitted.append(pool.submit(member, index))
            except RuntimeError:  # the pool takes no more work (the interpreter is shutting down): run them here
                break
        return [f.result() for f in submitted] + [member(i) for i in range(len(submitted), len(self.members))]

    def peak_bytes(self, shape: Sequence[int]) -> int:
        """The most memory ``member_probabilities`` takes on a volume of ``shape`` (model orientation), besides
        the loaded networks: every array it makes (``fast_member_probs``'s, counted from its code), the members
        running side by side, and each network's activations for one batch (``BATCH_PIXELS``).

        Checked against measurements by ``python -m bench.model_memory`` and ``tests/test_model_memory.py``.
        """
        voxels = math.prod(shape)
        kept = 2 * 4 * voxels  # the float32 volume and its normalised copy
        running, results, activations = [], 0, 0
        for (model, cfg), run in zip(self.members, self.runners, strict=True):
            classes = int(cfg.get("n_classes", 3))
            results += 4 * classes * voxels  # each member's probabilities, kept until the mean
            if run is None or is_3d(cfg):  # the PyTorch reference path: the whole volume at once
                running.append(4 * voxels * (classes + 1) * 64)
                continue
            axis, channels = int(cfg["axis"]), 2 * int(cfg["context"]) + 1
            views = 2 if self.flips and cfg.get("tta", False) else 1
            plane = [n for i, n in enumerate(shape) if i != axis]
            size = int(cfg["size"]) if self.canvas == "fixed" else 0
            padded = math.prod(target_size(tuple(plane), size, model.size_multiple))
            slices = views * int(shape[axis])
            running.append(4 * (views * channels * voxels  # the context stacks
                                + slices * channels * padded  # padded and concatenated
                                + 2 * slices * classes * padded  # the batches' outputs and their concatenation
                                + slices * classes * (voxels // int(shape[axis]))  # cropped back
                                + 2 * classes * voxels))  # the mirrored passes' mean
            activations += ACTIVATION_BYTES_PER_PIXEL_PER_BASE * int(cfg["base"]) * BATCH_PIXELS
        side_by_side = sum(sorted(running, reverse=True)[:self.parallel_members])
        return kept + side_by_side + results + 4 * 3 * voxels + activations  # + their mean

    def _member_pool(self) -> ThreadPoolExecutor:
        with self._pool_guard:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.parallel_members, thread_name_prefix="ensemble-member")
            return self._pool

    def reference_probabilities(self, volume: np.ndarray) -> np.ndarray:
        """``probabilities`` by the plain PyTorch path (unfolded networks, one pass per mirror), for comparison."""
        vol = _checked_volume(volume)
        tta = None if self.flips else False
        with torch.inference_mode():
            return sum(predict_probs_tta(m, vol, cfg, self.device, tta) for m, cfg in self.members) / len(self.members)

    def segment_reference(self, volume: np.ndarray) -> np.ndarray:
        """``segment`` by the plain PyTorch path, for comparison."""
        return np.argmax(self.reference_probabilities(volume), axis=0).astype(np.uint8)


def mean_probabilities(members: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's class probabilities: the mean of its members' (what ``segment`` takes the argmax of)."""
    return sum(members[1:], members[0].copy()) / len(members)


def version_settings(inference: Mapping[str, Any]) -> dict[str, Any]:
    """``HippocampusSegmenter.load`` keywords (members, flips, canvas) for a registry version's ``inference`` block.

    One reading of the manifest's settings, shared by the server (``handlers.hippocampus``) and
    ``python -m models.evaluate --version``, so a version is evaluated exactly as it is served.
    """
    members = inference.get("members", "all")
    return {"members": None if members == "all" else [int(i) for i in members],
            "flips": bool(inference.get("flips", True)), "canvas": str(inference.get("canvas", "fixed"))}


def select_members(members: Sequence[int] | None, available: int) -> tuple[int, ...]:
    """Validated member indices (all ``available`` ones when ``members`` is None)."""
    if members is None:
        return tuple(range(available))
    indices = tuple(int(i) for i in members)
    if not indices:
        raise ValueError("members: give at least one member index, or None for all")
    bad = [i for i in indices if not 0 <= i < available]
    if bad:
        raise ValueError(f"members: index {bad[0]} is out of range; the checkpoint has {available} "
                         f"member(s), indices 0-{available - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"members: {list(indices)} lists a member twice")
    return indices


def settings_suffix(indices: tuple[int, ...], available: int, flips: bool, canvas: str = "fixed") -> str:
    """The part of ``version`` naming non-default inference settings ("" for the full ensemble with flips)."""
    parts = []
    if indices != tuple(range(available)):
        parts.append("members=" + ",".join(map(str, indices)))
    if not flips:
        parts.append("flips=off")
    if canvas != "fixed":
        parts.append(f"canvas={canvas}")
    return "".join(" " + p for p in parts)


def _checked_volume(volume: np.ndarray) -> np.ndarray:
    """``volume`` as finite float32 after checking it is a real 3D array (ValueError otherwise)."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    if not np.issubdtype(vol.dtype, np.number) or np.issubdtype(vol.dtype, np.complexfloating):
        raise ValueError(f"expected a real numeric array, got dtype {vol.dtype}")
    vol = vol.astype(np.float32, copy=False)
    if not np.all(np.isfinite(vol)):
        vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
    return vol
