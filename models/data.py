"""Data handling for the hippocampus (MSD Task04) segmentation model.

Volumes are kept in the raw array order returned by nibabel
(``img.get_fdata()``).  For this data set that order is (x, y, z) with an
identity affine, i.e. axis 0 runs left->right, axis 1 posterior->anterior
and axis 2 inferior->superior (RAS).  The anterior/posterior labels are
therefore separated along axis 1, which must never be flipped during
augmentation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_id(path: str | os.PathLike) -> str:
    """File name without the NIfTI suffix (``hippocampus_001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Pair image and label files by file name; returns {case_id: (image, label)}."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    labels = {}
    for p in labels_dir.iterdir():
        if p.name.startswith(".") or not p.name.endswith(NIFTI_SUFFIXES):
            continue
        labels[case_id(p)] = p
    pairs = {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(NIFTI_SUFFIXES):
            continue
        cid = case_id(p)
        if cid in labels:
            pairs[cid] = (p, labels[cid])
    return dict(sorted(pairs.items()))


def dataset_pairs(data_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Pairs of a data directory laid out as ``images/`` and ``labels/``."""
    data_dir = Path(data_dir)
    return list_pairs(data_dir / "images", data_dir / "labels")


def split_cases(cases: list[str], seed: int = 0,
                fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Deterministic train/val/test split by volume.

    The sorted case list is shuffled with ``numpy.random.default_rng(seed)``;
    val and test get ``round(fraction * n)`` cases each (at least one each when
    there are three or more cases) and the rest goes to train.  Each returned
    list is sorted.
    """
    cases = sorted(set(cases))
    n = len(cases)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [cases[i] for i in order]
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"not enough cases ({n}) for a train/val/test split")
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train:n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val:]),
    }


def load_nifti(path: str | os.PathLike) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def load_pair(image_path, label_path) -> tuple[np.ndarray, np.ndarray]:
    image = load_nifti(image_path)
    label = np.rint(load_nifti(label_path)).astype(np.uint8)
    if image.shape != label.shape:
        raise ValueError(f"shape mismatch {image.shape} vs {label.shape} for {image_path}")
    return image, label


def normalize(volume: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentile range, then z-score (per volume)."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    v = np.clip(v, lo, hi)
    std = float(v.std())
    return ((v - float(v.mean())) / (std if std > 1e-6 else 1.0)).astype(np.float32)


@dataclass(frozen=True)
class PadCrop:
    """Centre padding/cropping of the trailing ``len(in_shape)`` axes to a fixed size."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def _slices(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(source, destination) index per axis: pad where the output is larger, crop where smaller."""
        src, dst = [], []
        for n, m in zip(self.in_shape, self.out_shape, strict=True):
            k = min(n, m)
            s, d = ((n - m) // 2, 0) if n > m else (0, (m - n) // 2)
            src.append(slice(s, s + k))
            dst.append(slice(d, d + k))
        return tuple(src), tuple(dst)

    def apply(self, arr: np.ndarray, fill: float = 0.0) -> np.ndarray:
        if len(self.in_shape) != len(self.out_shape):
            raise ValueError(f"shapes {self.in_shape} and {self.out_shape} differ in rank")
        lead = arr.shape[:arr.ndim - len(self.in_shape)]
        out = np.full(lead + tuple(self.out_shape), fill, dtype=arr.dtype)
        src, dst = self._slices()
        out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
        return out

    def undo(self, arr: np.ndarray, fill: float = 0) -> np.ndarray:
        return PadCrop(tuple(self.out_shape), tuple(self.in_shape)).apply(arr, fill)


def target_size(shape: tuple[int, ...], size: int | tuple[int, ...], multiple: int) -> tuple[int, ...]:
    """At least ``size`` per axis; larger inputs are padded up to a multiple instead of cropped."""
    sizes = (size,) * len(shape) if isinstance(size, int) else tuple(size)
    return tuple(max(s, int(math.ceil(n / multiple) * multiple)) for n, s in zip(shape, sizes, strict=True))


def context_slices(volume: np.ndarray, axis: int, context: int) -> np.ndarray:
    """Stack every slice along ``axis`` with its neighbours as channels.

    Returns an array (n_slices, 2 * context + 1, A, B) where (A, B) are the
    remaining axes in their original order.  Neighbours beyond the volume
    border repeat the edge slice.
    """
    v = np.moveaxis(volume, axis, 0)
    n = v.shape[0]
    idx = np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :]
    idx = np.clip(idx, 0, n - 1)
    return v[idx]


def volume_to_samples(image: np.ndarray, label: np.ndarray | None, axis: int, context: int,
                      size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised, padded 2.5D slices (and padded label slices) of one volume."""
    x = context_slices(normalize(image), axis, context)
    pc = PadCrop(x.shape[-2:], (size, size))
    x = pc.apply(x, 0.0)
    y = None
    if label is not None:
        y = pc.apply(np.moveaxis(label, axis, 0), 0)
    return x, y


def load_samples(pairs: dict[str, tuple[Path, Path]], cases: list[str], axis: int, context: int,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
    """2.5D training samples of ``cases``: (slices, 2 * context + 1, size, size) and their labels."""
    xs, ys = [], []
    for c in cases:
        img, lab = load_pair(*pairs[c])
        x, y = volume_to_samples(img, lab, axis, context, size)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def load_volumes(pairs: dict[str, tuple[Path, Path]], cases: list[str],
                 shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """3D training samples of ``cases``: normalised volumes centre-padded to ``shape``, and their labels.

    Volumes are (N, 1, *shape), labels (N, *shape).
    """
    xs, ys = [], []
    for c in cases:
        img, lab = load_pair(*pairs[c])
        pc = PadCrop(img.shape, tuple(shape))
        xs.append(pc.apply(normalize(img), 0.0))
        ys.append(pc.apply(lab, 0))
    return np.stack(xs)[:, None].astype(np.float32), np.stack(ys).astype(np.int64)


def _uniform(rand, *shape, spread: float):
    """Uniform samples in [-spread, spread]."""
    return (rand(*shape) * 2 - 1) * spread


def _augment_intensity(x, rand, generator):
    """Per-sample gain and offset (+-15 %), Gaussian noise on 30 % of the samples."""
    import torch

    ones = (1,) * (x.ndim - 1)
    x = x * (1 + _uniform(rand, x.shape[0], *ones, spread=0.15)) + _uniform(rand, x.shape[0], *ones, spread=0.15)
    noise = rand(x.shape[0], *ones) < 0.3
    return x + noise * 0.05 * torch.randn(x.shape, generator=generator, device=x.device)


def _warp(x, y, theta, soft=None):
    """Resample images (and soft targets) bilinearly and labels by nearest neighbour on the grid of ``theta``."""
    import torch.nn.functional as F

    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False)[:, 0].long()
    if soft is not None:
        soft = F.grid_sample(soft, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x, y, soft


def augment_batch(x, y, generator=None, flip_dim: int | None = None, p_affine: float = 0.7, soft=None):
    """Batched torch augmentation of 2.5D slices: random rotation/scale, L-R flip, intensity.

    ``flip_dim`` is the tensor dimension of ``x`` (B, C, H, W) corresponding
    to the left-right axis: 2 or 3 when it lies in the image plane, 1 when the
    volume is sliced along it (a left-right mirror then only reverses the order
    of the neighbouring-slice channels); None disables flipping.

    ``soft`` (B, K, H, W), e.g. a teacher's foreground probabilities for distillation, is flipped and
    warped with the labels (bilinearly, zero outside); then ``(x, y, soft)`` is returned instead of
    ``(x, y)``. The random draws are the same with or without it.
    """
    import torch

    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)

    if flip_dim is not None:
        flip = rand(b) < 0.5
        if flip.any():
            x = x.clone()
            y = y.clone()
            x[flip] = x[flip].flip(flip_dim)
            if flip_dim >= 2:  # flip_dim 1 = slice-order (context channel) reversal: label unchanged
                y[flip] = y[flip].flip(flip_dim - 1)
                if soft is not None:
                    soft = soft.clone()
                    soft[flip] = soft[flip].flip(flip_dim)
    use = rand(b) < p_affine
    if use.any():
        ang = _uniform(rand, b, spread=math.radians(15)) * use
        scale = 1 + _uniform(rand, b, spread=0.12) * use
        tx = _uniform(rand, b, spread=0.08) * use
        ty = _uniform(rand, b, spread=0.08) * use
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        x, y, soft = _warp(x, y, theta, soft)
    x = _augment_intensity(x, rand, generator)
    return (x, y) if soft is None else (x, y, soft)


def _rotation_3d(angles):
    """Rotation matrices (B, 3, 3) from per-sample angles (B, 3) about the three axes."""
    import torch

    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, 1) for r in rows], 1)

    rx = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    ry = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    rz = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return rz @ ry @ rx


def augment_volumes(x, y, crop: tuple[int, int, int], generator=None, p_affine: float = 0.8):
    """Batched augmentation of 3D samples (B, 1, D, H, W) and labels (B, D, H, W).

    A random ``crop`` (the same window for the whole batch), a left-right
    mirror (volume axis 0, label-safe; anterior/posterior is never flipped),
    rotation (+-15 deg about each axis), scaling (+-12 %), shift (+-6 %) and
    the intensity changes of the 2.5D augmentation.
    """
    import torch

    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)

    offsets = [int(torch.randint(0, n - c + 1, (1,), generator=generator))
               for n, c in zip(x.shape[2:], crop, strict=True)]
    window = tuple(slice(o, o + c) for o, c in zip(offsets, crop, strict=True))
    x, y = x[(slice(None), slice(None), *window)].clone(), y[(slice(None), *window)].clone()
    flip = rand(b) < 0.5
    x[flip] = x[flip].flip(2)
    y[flip] = y[flip].flip(1)
    use = (rand(b) < p_affine).float()
    rot = _rotation_3d(_uniform(rand, b, 3, spread=math.radians(15)) * use[:, None])
    scale = 1 + _uniform(rand, b, spread=0.12) * use
    shift = _uniform(rand, b, 3, spread=0.06) * use[:, None]
    theta = torch.cat([rot / scale[:, None, None], shift[:, :, None]], 2)
    x, y, _ = _warp(x, y, theta)
    return _augment_intensity(x, rand, generator), y
