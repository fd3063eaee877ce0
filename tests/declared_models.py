"""Test helper: small segmentation networks trained in seconds on synthetic spheres, exported as ONNX and TorchScript.

A phantom is a few spheres (one intensity each) in patient space. ``phantom_series`` samples it on
a DICOM series' grid (any orientation, anisotropic spacing) and gives the true label of every
voxel, so a segmentation's volumes can be compared with the truth. The networks are trained on
the very preprocessing the declaration states (``models.declared``: RAS, 1.5 mm, window to 0-1),
so what they learn is what the runner feeds them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.dicom.writing import series_from_volume
from models.declared.geometry import Grid

SPACING_MM = 1.5
GAIN = 20.0
LR = 0.01
WINDOW = (0.0, 1000.0)
#: Structure k (1-based) of a family of n has intensity INTENSITY[n][k - 1].
INTENSITY = {1: (600,), 5: (200, 360, 520, 680, 840)}


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]  # LPS mm
    radius: float
    label: int
    intensity: float


def spheres(count: int, seed: int) -> list[Sphere]:
    """``count`` disjoint spheres (radius 9-13 mm) with the family's intensities, around the origin."""
    rng = np.random.default_rng(seed)
    placed: list[Sphere] = []
    while len(placed) < count:
        centre = tuple(float(v) for v in rng.uniform(-28, 28, 3))
        radius = float(rng.uniform(9, 13))
        if all(np.linalg.norm(np.subtract(centre, s.centre)) > radius + s.radius + 4 for s in placed):
            placed.append(Sphere(centre, radius, len(placed) + 1, INTENSITY[count][len(placed)]))
    return placed


def positions(shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation, origin) -> np.ndarray:
    """LPS positions (depth, rows, columns, 3) of a series' voxel centres, as ``series_from_volume`` places them."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    k, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (np.asarray(origin, float) + k[..., None] * spacing[0] * normal + r[..., None] * spacing[1] * col_dir
            + c[..., None] * spacing[2] * row_dir)


def phantom(shape, spacing, orientation, origin, balls: list[Sphere], seed: int = 0, noise: float = 25.0):
    """(int16 voxels, true labels) of ``balls`` sampled at the grid's voxel centres, with Gaussian noise."""
    where = positions(shape, spacing, orientation, origin)
    voxels = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    for ball in balls:
        inside = np.linalg.norm(where - np.asarray(ball.centre), axis=-1) <= ball.radius
        voxels[inside] = ball.intensity
        labels[inside] = ball.label
    voxels += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    return np.rint(voxels).astype(np.int16), labels


#: The test series: oblique (rotated 25 degrees about the patient's A-P axis), columns running right to left
#: (flipped), 3 mm slices and 0.9 x 1.1 mm pixels.
ANGLE = np.deg2rad(25)
OBLIQUE = (-np.cos(ANGLE), 0.0, np.sin(ANGLE), 0.0, 1.0, 0.0)
SHAPE, GRID_SPACING = (30, 80, 76), (3.0, 1.1, 0.9)


def centred_origin(shape, spacing, orientation) -> tuple[float, float, float]:
    """The first voxel's position that puts the grid's centre at the patient origin (where the spheres are)."""
    last = positions(tuple(shape), spacing, orientation, (0, 0, 0))[tuple(n - 1 for n in shape)]
    return tuple(float(v) for v in -last / 2)


def phantom_study(count: int, seed: int = 7, description: str = "Phantom") -> tuple[list, np.ndarray, list[Sphere]]:
    """A DICOM series (oblique, flipped, anisotropic) of ``count`` spheres, its true labels and the spheres."""
    balls = spheres(count, seed)
    origin = centred_origin(SHAPE, GRID_SPACING, OBLIQUE)
    voxels, labels = phantom(SHAPE, GRID_SPACING, OBLIQUE, origin, balls, seed)
    return series_from_volume(voxels, spacing=GRID_SPACING, orientation=OBLIQUE, origin=origin,
                              description=description), labels, balls


def series_affine(spacing, orientation, origin) -> np.ndarray:
    """The (column, row, slice) -> RAS affine of a series (as the handler computes it from the headers)."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[2]
    affine[:3, 1] = col_dir * spacing[1]
    affine[:3, 2] = np.cross(row_dir, col_dir) * spacing[0]
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def training_pairs(count: int, spacing_mm: float | None, seeds=(1, 2, 3)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Network inputs and targets as the declaration's preprocessing makes them (RAS, ``spacing_mm`` or the
    series' own, the window), from axis-aligned and oblique series."""
    pairs = []
    geometries = [((28, 80, 80), (3.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0)), (SHAPE, GRID_SPACING, OBLIQUE),
                  ((64, 52, 52), (1.3, 1.6, 1.6), (0, 1, 0, 0, 0, -1))]
    for seed, (shape, spacing, orientation) in zip(seeds, geometries, strict=False):
        origin = centred_origin(shape, spacing, orientation)
        voxels, labels = phantom(shape, spacing, orientation, origin, spheres(count, seed), seed)
        affine = series_affine(spacing, orientation, origin)
        grid = Grid.plan(labels.T.shape, affine, "RAS", None if spacing_mm is None else (spacing_mm,) * 3)
        x = np.clip((grid.to_network(voxels.T) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
        y = np.rint(grid.to_network(labels.T, order=0)).astype(np.int64)
        pairs.append((x.astype(np.float32), y))
    return pairs


def thermometer(conv: nn.Module, channel: int = 0) -> None:
    """Start the first convolution as intensity thresholds: filter j is ReLU(GAIN (centre - j / width)), plus noise.

    Only an initialisation, so that a few hundred steps suffice (the gain spares the head the large weights that
    bands of intensity 0.16 wide need); every weight is still trained.
    """
    with torch.no_grad():
        conv.weight.mul_(0.05)
        centre = tuple(k // 2 for k in conv.weight.shape[2:])
        width = conv.weight.shape[0]
        conv.weight[(slice(None), channel, *centre)] += GAIN
        conv.bias.copy_(-GAIN * torch.arange(width, dtype=torch.float32) / width)


class Net3D(nn.Module):
    """Intensity features of each voxel beside their maximum over its neighbours, then per-voxel layers: enough to
    tell a bright sphere's blurred rim from a dimmer sphere."""

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        self.classes = classes
        self.features = nn.Conv3d(1, width, 3, padding=1)
        self.around = nn.MaxPool3d(5, 1, 2)
        self.head = nn.Conv3d(2 * width, classes, 1)
        thermometer(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        return self.head(torch.cat([f, self.around(f)], dim=1))


class Net2D(nn.Module):
    """The 2D counterpart, taking a slice and its neighbours as channels."""

    def __init__(self, classes: int, context: int = 1, width: int = 16) -> None:
        super().__init__()
        self.classes = classes
        self.features = nn.Conv2d(2 * context + 1, width, 3, padding=1)
        self.around = nn.MaxPool2d(5, 1, 2)
        self.head = nn.Conv2d(2 * width, classes, 1)
        thermometer(self.features, channel=context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        return self.head(torch.cat([f, self.around(f)], dim=1))


def train(net: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], steps: int,
          patch: int) -> nn.Module:
    """Adam on random ``patch``-sized crops of the inputs (the spatial axes after batch and channels)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; tiny batches gain nothing from more
    rng = np.random.default_rng(0)
    optimiser = torch.optim.Adam(net.parameters(), lr=LR)
    counts = sum(torch.bincount(y.ravel(), minlength=net.classes) for y in targets).float()
    weights = (counts.sum() / counts.clamp(min=1)).sqrt()  # the structures are a few percent of the voxels
    loss = nn.CrossEntropyLoss(weight=weights / weights.mean())
    for step in range(steps):
        i = step % len(inputs)
        x, y = inputs[i], targets[i]
        foreground = torch.nonzero(y.amax(dim=0))  # over the batch: (1, X, Y, Z) or (slices, A, B)
        if step % 4 and len(foreground):  # three crops in four around a structure: they are small
            centre = foreground[int(rng.integers(len(foreground)))].tolist()
            corner = [min(max(0, c - patch // 2), max(0, n - patch)) for c, n in zip(centre, x.shape[2:], strict=True)]
        else:
            corner = [int(rng.integers(0, max(1, n - patch + 1))) for n in x.shape[2:]]
        window = tuple(slice(c, c + patch) for c in corner)
        optimiser.zero_grad()
        value = loss(net(x[(slice(None), slice(None), *window)]), y[(slice(None), *window)])
        value.backward()
        optimiser.step()
    return net.eval()


def train_3d(count: int, spacing_mm: float | None, steps: int = 200) -> nn.Module:
    pairs = training_pairs(count, spacing_mm)
    return train(Net3D(count + 1), [torch.from_numpy(x)[None, None] for x, _ in pairs],
                 [torch.from_numpy(y)[None] for _, y in pairs], steps, patch=24)


def train_2d(count: int, spacing_mm: float | None, axis: int = 2, context: int = 1, steps: int = 200) -> nn.Module:
    inputs, targets = [], []
    for x, y in training_pairs(count, spacing_mm):
        v = np.moveaxis(x, axis, 0)
        n = v.shape[0]
        index = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :], 0, n - 1)
        inputs.append(torch.from_numpy(np.ascontiguousarray(v[index])))
        targets.append(torch.from_numpy(np.ascontiguousarray(np.moveaxis(y, axis, 0))))
    return train(Net2D(count + 1, context), inputs, targets, steps, patch=48)


def export(net: nn.Module, folder: Path, name: str, dims: int, channels: int = 1) -> dict[str, Path]:
    """``net`` as ``name``.onnx (dynamic batch and size) and ``name``.ts in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, channels) + (16,) * dims)
    onnx_path, ts_path = folder / f"{name}.onnx", folder / f"{name}.ts"
    axes = {0: "n", **{i + 2: f"s{i}" for i in range(dims)}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporters' notices about their successors
        torch.onnx.export(net, (example,), str(onnx_path), input_names=["image"], output_names=["pred"],
                          dynamic_axes={"image": axes, "pred": axes}, dynamo=False)
        torch.jit.trace(net, example).save(str(ts_path))
    return {"onnx": onnx_path, "torchscript": ts_path}


#: Structures of the two test families: a one-structure family and a five-structure one (codes from SNOMED CT).
ORGANS = [("Spleen", "78961009"), ("Liver", "10200004"), ("Pancreas", "15776009"), ("Left kidney", "18639004"),
          ("Right kidney", "9846003")]
COLOURS = [(230, 80, 60), (60, 160, 230), (240, 200, 60), (120, 220, 120), (200, 120, 240)]


def structures(count: int) -> list[dict]:
    return [{"name": name, "label": k, "color": list(COLOURS[k - 1]),
             "anatomy": {"value": code, "scheme": "SCT", "meaning": name}}
            for k, (name, code) in enumerate(ORGANS[:count], 1)]


def declared_version(weights: Path, framework: str, count: int, inference: dict, spacing_mm: float | None,
                     **overrides) -> dict:
    """A manifest version block declaring a phantom network (``weights`` relative to the manifest, or absolute)."""
    from models.registry import file_sha256

    block = {
        "weights": str(weights), "sha256": file_sha256(weights),
        "architecture": f"test network, {count} structure(s)", "framework": framework,
        "input": {"modality": "MR", "series_description": "Phantom"},
        "preprocessing": {"orientation": "RAS", "spacing_mm": spacing_mm,
                          "intensity": [{"window": {"source": list(WINDOW), "to": [0, 1], "clip": True}}]},
        "inference": inference,
        "postprocessing": {"activation": "softmax", "discretize": "argmax", "largest_component": True},
        "structures": structures(count),
        "training_data": {"name": "synthetic spheres"}, "date": "2026-12-07",
    }
    block.update(overrides)
    return block


def declared_family(command: str, versions: dict[str, dict], default: str, description: str = "Phantom") -> dict:
    return {"description": description, "command": command, "default_version": default, "versions": versions}


def trained_networks(folder: Path) -> dict[str, dict[str, Path]]:
    """The test networks, trained and exported into ``folder``: by name, their ONNX and TorchScript files.

    ``one``: 3D, one structure, on 1.5 mm RAS; ``five``: 3D, five structures, on the series' own spacing;
    ``one-slices``: 2D, one structure, axial slices (axis 2 of RAS) with one neighbour each side, on 1.5 mm.
    """
    return {"one": export(train_3d(1, SPACING_MM), folder, "one", 3),
            "five": export(train_3d(5, None), folder, "five", 3),
            "one-slices": export(train_2d(1, SPACING_MM), folder, "one-slices", 2, channels=3)}
