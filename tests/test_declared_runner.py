"""The declared runner: its steps one by one, then networks trained here on synthetic spheres, run on an oblique,
flipped, anisotropic DICOM series, their volumes within 5 % of the truth."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.hippocampus.orientation import ras_affine
from inference.dicom.series import load_volume
from models.declared.geometry import Grid
from models.declared.runner import (
    DeclarationError,
    DeclaredSegmenter,
    apply_intensity,
    clean_components,
    crop_box,
    discretize,
    infer,
    load_network,
    pad_widths,
)
from models.declared.schema import Crop, Inference, IntensityStep, Pad, Postprocessing, parse_declaration
from tests import declared_models as phantom


# -- geometry --------------------------------------------------------------------------------------
def test_reorienting_a_flipped_permuted_series_and_back_is_exact():
    # index axis 0 runs posterior (0.8 mm), axis 1 superior (1.2 mm), axis 2 left (2 mm)
    affine = np.array([[0, 0, -2.0, 10], [-0.8, 0, 0, 5], [0, 1.2, 0, -3], [0, 0, 0, 1]])
    voxels = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    grid = Grid.plan(voxels.shape, affine, "RAS", None)
    oriented = grid.to_network(voxels)
    assert oriented.shape == (7, 5, 6) and grid.spacing == (2.0, 0.8, 1.2)
    # RAS x is index axis 2 reversed, y index axis 0 reversed, z index axis 1
    assert oriented[0, 0, 0] == voxels[4, 0, 6] and oriented[6, 4, 5] == voxels[0, 5, 0]
    assert oriented[2, 1, 3] == voxels[3, 3, 4]
    labels = (voxels % 5).astype(np.uint8)
    assert np.array_equal(grid.to_source(grid.to_network(labels, order=0).astype(np.uint8)), labels)


def test_resampling_keeps_the_extent_and_labels_come_back_by_nearest_neighbour():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    grid = Grid.plan((30, 30, 10), affine, "RAS", (1.5, 1.5, 1.5))
    assert grid.shape == (20, 20, 20) and grid.spacing == (1.5, 1.5, 1.5)
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32), (30, 30, 10))
    resampled = grid.to_network(ramp)
    assert resampled[0, 0, 0] == 0 and resampled[0, 0, -1] == 9  # the ends stay the ends
    assert np.all(np.diff(resampled[0, 0]) >= 0)
    labels = np.zeros(grid.shape, np.uint8)
    labels[:, :, 10:] = 1  # the upper half along z
    back = grid.to_source(labels)
    assert back.shape == (30, 30, 10) and back[0, 0].tolist() == [0] * 5 + [1] * 5


# -- intensity, crop, padding ----------------------------------------------------------------------
def test_intensity_steps_do_what_they_say():
    x = np.array([-100, 0, 50, 100, 300], np.float32)
    window = apply_intensity(x, [IntensityStep("window", (0, 100), (0, 1), clip=True)])
    assert window.tolist() == [0, 0, 0.5, 1, 1]
    unclipped = apply_intensity(x, [IntensityStep("window", (0, 100), (0, 1), clip=False)])
    assert unclipped.tolist() == [-1, 0, 0.5, 1, 3]
    z = apply_intensity(x, [IntensityStep("zscore")])
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    nonzero = apply_intensity(x, [IntensityStep("zscore", nonzero=True)])
    values = x[x != 0]
    assert nonzero[1] == 0 and np.allclose(nonzero[x != 0], (values - values.mean()) / values.std(), atol=1e-6)
    assert apply_intensity(x, [IntensityStep("minmax", to=(0, 1))]).tolist() == pytest.approx([0, .25, .375, .5, 1])
    ramp = np.arange(101, dtype=np.float32)
    clipped = apply_intensity(ramp, [IntensityStep("percentiles", (10, 90), None, clip=True)])
    assert clipped.min() == 10 and clipped.max() == 90 and clipped[50] == 50
    scaled = apply_intensity(ramp, [IntensityStep("percentiles", (10, 90), (0, 1), clip=True)])
    assert scaled[10] == 0 and scaled[90] == 1 and scaled[50] == pytest.approx(0.5)


def test_crop_to_the_foreground_with_a_margin_and_to_a_box():
    x = np.zeros((20, 20, 20), np.float32)
    x[5:8, 10:12, 3:4] = 1
    assert crop_box(x, Crop("foreground", above=0, margin=(1, 2, 3))) == (slice(4, 9), slice(8, 14), slice(0, 7))
    assert crop_box(np.zeros_like(x), Crop("foreground")) == (slice(0, 20),) * 3  # nothing above: all of it
    assert crop_box(x, Crop("box", start=(2, 2, 2), size=(30, 4, 4))) == (slice(2, 20), slice(2, 6), slice(2, 6))
    with pytest.raises(DeclarationError, match="crop box .* lies outside"):
        crop_box(x, Crop("box", start=(25, 0, 0), size=(4, 4, 4)))


def test_padding_to_a_multiple_a_minimum_and_a_patch_centred():
    assert pad_widths((13, 16, 5), Pad(multiple=(8, 8, 8)), Inference()) == [(1, 2), (0, 0), (1, 2)]
    assert pad_widths((13, 16, 5), Pad(minimum=(0, 20, 0)), Inference()) == [(0, 0), (2, 2), (0, 0)]
    window = Inference(mode="sliding_window", patch=(16, 16, 16))
    assert pad_widths((13, 20, 16), None, window) == [(1, 2), (0, 0), (0, 0)]
    slices = Inference(mode="slices", axis=1)  # the slicing axis is never padded
    assert pad_widths((13, 13, 13), Pad(multiple=(8, 8, 8)), slices) == [(1, 2), (0, 0), (1, 2)]


# -- inference modes, with networks whose output is known ------------------------------------------
def two_channels(x: np.ndarray) -> np.ndarray:
    """A 'network' answering (x, 1 - x) per voxel: every mode must give back the input in channel 0."""
    centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
    return np.concatenate([centre, 1 - centre], axis=1)


@pytest.mark.parametrize("inference", [
    Inference(mode="whole"),
    Inference(mode="slices", axis=1, context=2, batch=3),
    Inference(mode="slices", axis=0, context=1, edge="zero", batch=64),
    Inference(mode="sliding_window", patch=(8, 8, 8), overlap=0.5, blend="constant", batch=5),
    Inference(mode="sliding_window", patch=(8, 6, 10), overlap=0.25, blend="gaussian", batch=1),
])
def test_every_mode_gives_each_voxel_its_own_answer(inference):
    x = np.random.default_rng(0).random((12, 11, 10)).astype(np.float32)
    out = infer(two_channels, x, inference)
    assert out.shape == (2, 12, 11, 10)
    assert np.allclose(out[0], x, atol=1e-5) and np.allclose(out[1], 1 - x, atol=1e-5)


def test_slices_stack_the_neighbours_as_channels():
    seen = []

    def network(x):
        seen.append(x.copy())
        return np.zeros((x.shape[0], 1, *x.shape[2:]), np.float32)

    x = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 2), np.float32)
    infer(network, x, Inference(mode="slices", axis=0, context=1, batch=10))
    assert seen[0][:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]  # edges repeated
    seen.clear()
    infer(network, x, Inference(mode="slices", axis=0, context=1, edge="zero", batch=10))
    assert seen[0][:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]


def test_a_network_returning_the_wrong_shape_is_a_clear_error():
    with pytest.raises(DeclarationError, match=r"the network returned \(1, 2, 4, 4, 4\) for an input of batch 1 "
                                               r"and size \(8, 8, 8\)"):
        infer(lambda x: np.zeros((1, 2, 4, 4, 4), np.float32), np.zeros((8, 8, 8), np.float32), Inference())


def test_argmax_thresholds_and_unknown_labels():
    logits = np.zeros((3, 1, 1, 4), np.float32)
    logits[1, 0, 0, 1] = logits[2, 0, 0, 2] = 5
    logits[:, 0, 0, 3] = [0, 4, 5]
    assert discretize(logits, Postprocessing(activation="softmax"), (1, 2))[0, 0].tolist() == [0, 1, 2, 2]
    assert discretize(logits, Postprocessing(), (1,))[0, 0].tolist() == [0, 1, 0, 0]  # 2 has no structure
    sigmoid = Postprocessing(activation="sigmoid", threshold=0.9)
    # channel c is label c + 1; where several exceed the threshold the later channel wins
    assert discretize(logits, sigmoid, (1, 2, 3))[0, 0].tolist() == [0, 2, 3, 3]


def test_largest_component_and_small_components_dropped_in_millimetres():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:6, 1:6, 1:6] = 1  # 125 voxels
    labels[10:12, 10:12, 10:12] = 1  # 8 voxels
    labels[15:18, 15:18, 15:17] = 2  # 18 voxels
    largest = clean_components(labels, Postprocessing(largest_component=True), (1, 2), 1.0)
    assert np.count_nonzero(largest == 1) == 125 and np.count_nonzero(largest == 2) == 18
    small = clean_components(labels, Postprocessing(min_component_mm3=40), (1, 2), 2.0)  # 20 voxels at 2 mm3
    assert np.count_nonzero(small == 1) == 125 and np.count_nonzero(small == 2) == 0


# -- trained networks on an oblique, flipped, anisotropic DICOM series ------------------------------
def segment_phantom(networks, name: str, framework: str, count: int, inference: dict, spacing_mm):
    series, truth, _ = phantom.phantom_study(count)
    volume = load_volume(series)
    declaration, problems = parse_declaration(phantom.declared_version(
        networks[name][framework], framework, count, inference, spacing_mm))
    assert problems == []
    segmenter = DeclaredSegmenter(declaration, load_network(networks[name][framework], framework),
                                  tuple(range(1, count + 1)))
    labels = segmenter.segment(volume.voxels.transpose(2, 1, 0), ras_affine(volume)).transpose(2, 1, 0)
    assert labels.shape == truth.shape and labels.dtype == np.uint8
    return labels, truth


def volume_ratios(labels: np.ndarray, truth: np.ndarray, count: int) -> list[float]:
    found = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    true = np.bincount(truth.ravel(), minlength=count + 1)[1:]
    return (found / true).round(3).tolist()


def test_the_series_is_oblique_flipped_and_anisotropic():
    series, truth, balls = phantom.phantom_study(1)
    volume = load_volume(series)
    assert volume.spacing == pytest.approx((3.0, 1.1, 0.9))
    rows = np.asarray(series[0].ImageOrientationPatient[:3], float)
    assert rows[0] < 0 and 0 < abs(rows[2]) < 1  # columns run right to left, tilted out of the axial plane
    assert 0.95 < np.count_nonzero(truth) * volume.voxel_volume_mm3 / (4 / 3 * np.pi * balls[0].radius ** 3) < 1.05


@pytest.mark.parametrize(("framework", "inference"), [
    ("onnx", {"mode": "whole"}),
    ("torchscript", {"mode": "whole"}),
    ("torchscript", {"mode": "sliding_window", "patch": [24, 24, 24], "overlap": 0.25, "blend": "gaussian",
                     "batch": 4}),
    ("onnx", {"mode": "sliding_window", "patch": [20, 28, 24], "overlap": 0.5, "blend": "constant"}),
])
def test_one_structure_resampled_to_1_5_mm_within_5_percent(phantom_networks, framework, inference):
    labels, truth = segment_phantom(phantom_networks, "one", framework, 1, inference, phantom.SPACING_MM)
    assert volume_ratios(labels, truth, 1)[0] == pytest.approx(1, abs=0.05)
    overlap = np.count_nonzero((labels == 1) & (truth == 1)) / np.count_nonzero(truth == 1)
    assert overlap > 0.9  # in the right place, not only the right size


def test_onnx_and_torchscript_give_the_same_labels(phantom_networks):
    onnx, _ = segment_phantom(phantom_networks, "one", "onnx", 1, {"mode": "whole"}, phantom.SPACING_MM)
    torchscript, _ = segment_phantom(phantom_networks, "one", "torchscript", 1, {"mode": "whole"}, phantom.SPACING_MM)
    assert np.count_nonzero(onnx != torchscript) <= 0.001 * onnx.size


def test_one_structure_slice_by_slice_with_neighbours_within_5_percent(phantom_networks):
    labels, truth = segment_phantom(phantom_networks, "one-slices", "onnx", 1,
                                    {"mode": "slices", "axis": 2, "context": 1, "batch": 16}, phantom.SPACING_MM)
    assert volume_ratios(labels, truth, 1)[0] == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("framework", ["onnx", "torchscript"])
def test_five_structures_on_the_series_own_spacing_within_5_percent(phantom_networks, framework):
    labels, truth = segment_phantom(phantom_networks, "five", framework, 5, {"mode": "whole"}, None)
    assert volume_ratios(labels, truth, 5) == pytest.approx([1] * 5, abs=0.05)
