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

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .data import PadCrop, context_slices, normalize, target_size
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


def load_network(state_dict: dict, config: dict, device: str) -> UNet:
    """One network from its ``state_dict`` and ``config``, in eval mode on ``device``."""
    model = build_model(config)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.to(device).eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HippocampusSegmenter:
    """Segments hippocampus head/body (anterior, label 1) and tail (posterior, label 2).

    A checkpoint holds either one network (``state_dict`` + ``config``) or
    several (``members``: list of {``state_dict``, ``config``}, e.g. networks
    slicing along different axes) whose class probabilities are averaged.
    """

    version: str

    def __init__(self, model: UNet, config: dict, version: str, device: str,
                 split: dict | None = None, members: list[tuple[UNet, dict]] | None = None) -> None:
        self.split = split  # train/val/test case ids the weights were trained with, if stored
        self.model = model
        self.members = members if members else [(model, config)]
        self.config = config
        self.version = version
        self.device = device

    @classmethod
    def load(cls, weights_path: str | os.PathLike | None = None,
             device: str | None = None) -> "HippocampusSegmenter":
        """Load a checkpoint (default: ``hippocampus_unet.pt`` next to this module).

        ``device`` defaults to ``"cuda"`` when available, else ``"cpu"``.
        """
        path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = dict(ckpt["config"])
        if "members" in ckpt:
            members = [(load_network(m["state_dict"], dict(m["config"]), device), dict(m["config"]))
                       for m in ckpt["members"]]
        else:
            members = [(load_network(ckpt["state_dict"], config, device), config)]
        name = ckpt.get("version", MODEL_NAME)
        version = f"{name} ({_sha256(path)[:12]})"
        return cls(members[0][0], config, version, device, ckpt.get("split"), members)

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
        vol = np.asarray(volume)
        if vol.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
        if not np.issubdtype(vol.dtype, np.number) or np.issubdtype(vol.dtype, np.complexfloating):
            raise ValueError(f"expected a real numeric array, got dtype {vol.dtype}")
        vol = vol.astype(np.float32, copy=False)
        if not np.all(np.isfinite(vol)):
            vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.inference_mode():
            return predict_ensemble(self.members, vol, self.device)
