"""models.quality (input checks, uncertainty, the flag) and models.calibrate (threshold, manifest blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from models.calibrate import choose_threshold, derive_validated_input, figures, replace_blocks
from models.quality import (
    DISAGREEMENT,
    SOFT_BOUNDARY,
    assess,
    check_input,
    input_properties,
    obliquity_degrees,
    structure_uncertainty,
)
from models.registry import ModelRegistry
from tests.conftest import PROJECT_ROOT

VALIDATED = {"modality": ["MR"], "voxel_size_mm": {"min": 1.0, "max": 1.0},
             "matrix": {"min": [31, 40, 24], "max": [43, 58, 47]}, "intensity_mean": {"min": 53.1, "max": 1500},
             "intensity_cv": {"min": 0.37, "max": 0.52}, "obliquity_deg": {"max": 0.0}}
CALIBRATION = {"threshold": 0.2, "validation": {"volumes": 35}, "test": {"volumes": 35}}


def crop(shape=(35, 50, 35), mean=300.0, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, 0.45 * mean, shape).clip(1)


def test_properties_of_an_axis_aligned_and_an_oblique_crop():
    props = input_properties(crop(), [1.0, 1.0, 1.0], np.eye(4), "MR")
    assert props["matrix"] == [35, 50, 35] and props["voxel_size_mm"] == [1.0, 1.0, 1.0]
    assert props["obliquity_deg"] == 0.0 and 0.35 < props["intensity_cv"] < 0.5
    tilt = np.radians(10)
    affine = np.eye(4)
    affine[:3, :3] = [[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]
    assert obliquity_degrees(affine) == pytest.approx(10.0)


def test_each_check_outside_its_range_is_named():
    good = input_properties(crop(), [1.0, 1.0, 1.0], np.eye(4), "MR")
    assert all(c["passed"] for c in check_input(good, VALIDATED))
    bad = {**good, "modality": "CT", "voxel_size_mm": [0.5, 1.0, 1.0], "matrix": [35, 80, 35],
           "intensity_mean": 10.0, "obliquity_deg": 3.0}
    failed = {c["check"] for c in check_input(bad, VALIDATED) if not c["passed"]}
    assert failed == {"modality", "voxel_size_mm", "matrix", "intensity_mean", "obliquity_deg"}
    quality = assess(bad, DISAGREEMENT, {"Anterior": {"unsure_fraction": 0.1, "volume_spread_mm3": 5}},
                     VALIDATED, CALIBRATION, "hippocampus 1.0")
    assert quality["flagged"] is True
    assert any(r.startswith("input: voxel_size_mm [0.5, 1.0, 1.0] mm outside the validated range 1.0 to 1.0")
               for r in quality["reasons"])
    assert any("modality CT" in r for r in quality["reasons"])


def test_uncertainty_above_the_threshold_flags_and_below_does_not():
    props = input_properties(crop(), [1.0, 1.0, 1.0], np.eye(4), "MR")
    calm = assess(props, DISAGREEMENT, {"Anterior": {"unsure_fraction": 0.19, "volume_spread_mm3": 5}},
                  VALIDATED, CALIBRATION, "hippocampus 1.0")
    assert calm["flagged"] is False and calm["reasons"] == [] and calm["calibration"]["test"]["volumes"] == 35
    unsure = assess(props, DISAGREEMENT, {"Anterior": {"unsure_fraction": 0.1, "volume_spread_mm3": 5},
                                          "Posterior": {"unsure_fraction": 0.3, "volume_spread_mm3": 40}},
                    VALIDATED, CALIBRATION, "hippocampus 1.0")
    assert unsure["flagged"] and unsure["reasons"] == [
        "uncertainty: Posterior 0.300 of its voxels unsure (member disagreement), above the calibrated 0.200"]


def test_a_version_without_blocks_is_flagged_saying_so():
    props = input_properties(crop(), [1.0, 1.0, 1.0], np.eye(4), "MR")
    quality = assess(props, SOFT_BOUNDARY, {"Anterior": {"unsure_fraction": 0.0, "volume_spread_mm3": 0}},
                     None, None, "hippocampus 2.0-distilled")
    assert quality["flagged"] is True
    assert len(quality["reasons"]) == 2
    assert "no declared validated input range" in quality["reasons"][0]
    assert "no uncertainty calibration" in quality["reasons"][1]


def test_member_disagreement_and_the_one_network_proxy():
    shape = (3, 10, 10, 10)
    agree = np.zeros(shape)
    agree[0] = 1.0
    agree[0, 2:6, 2:6, 2:6], agree[1, 2:6, 2:6, 2:6] = 0.0, 1.0  # 64 voxels of structure 1
    other = agree.copy()
    other[0, 2:6, 2:6, 5], other[1, 2:6, 2:6, 5] = 1.0, 0.0  # the second member leaves out 16 of them
    method, per = structure_uncertainty([agree, other], {"A": 1, "B": 2}, 2.0)
    assert method == DISAGREEMENT
    # a 1-1 split of the mean is labelled background (the first class): 16 unsure over the 48 voxels labelled A
    assert per["A"]["unsure_fraction"] == pytest.approx(16 / 48, abs=1e-4) and per["A"]["volume_spread_mm3"] == 32.0
    assert per["B"]["unsure_fraction"] == 0.0
    soft = agree.copy()
    soft[1, 2:6, 2:6, 5], soft[0, 2:6, 2:6, 5] = 0.6, 0.4  # still labelled A, but unsure
    method, per = structure_uncertainty([soft], {"A": 1}, 1.0)
    assert method == SOFT_BOUNDARY and per["A"]["unsure_fraction"] == pytest.approx(16 / 64)


def test_threshold_separates_low_dice_within_the_flag_budget():
    scores = [0.1, 0.12, 0.14, 0.3, 0.25, 0.11, 0.13, 0.15]
    low = [False, False, False, True, True, False, False, False]
    threshold = choose_threshold(scores, low, max_flagged=0.25)
    assert 0.15 <= threshold < 0.25
    assert figures(scores, low, threshold) == {
        "volumes": 8, "low_dice": 2, "low_dice_flagged": 2, "flagged": 2, "share_of_low_dice_flagged": 1.0,
        "share_flagged": 0.25, "share_of_flagged_low_dice": 1.0}
    # a budget of one flag: only the worst one
    assert choose_threshold(scores, low, max_flagged=0.125) == 0.25


def test_derived_ranges_are_the_training_cases_extremes():
    rows = [input_properties(crop((31 + i, 45, 30), 100 + 50 * i, i), [1.0, 1.0, 1.0], np.eye(4), "MR")
            for i in range(3)]
    block = derive_validated_input(rows)
    assert block["matrix"] == {"min": [31, 45, 30], "max": [33, 45, 30]}
    assert block["intensity_mean"]["min"] == pytest.approx(rows[0]["intensity_mean"], abs=0.05)
    assert all(c["passed"] for r in rows for c in check_input(r, block))


def test_blocks_written_into_the_manifest_replace_earlier_ones_and_keep_comments(tmp_path):
    manifest = tmp_path / "manifest.yaml"
    text = (PROJECT_ROOT / "models" / "manifest.yaml").read_text()
    manifest.write_text(text)
    for weights in {v["weights"] for v in yaml.safe_load(text)["families"]["hippocampus"]["versions"].values()}:
        (tmp_path / weights).symlink_to(PROJECT_ROOT / "models" / weights)
    blocks = {"validated_input": {"modality": ["MR"]}, "uncertainty": {"threshold": 0.5},
              "drift_reference": "drift/x.json"}
    written = replace_blocks(text, "hippocampus", "1.0-fast", blocks)
    written = replace_blocks(written, "hippocampus", "1.0-fast", blocks)  # twice: still one of each
    manifest.write_text(written)
    assert written.count("threshold: 0.5") == 1 and written.startswith("# The model registry's manifest")
    version = ModelRegistry.load(manifest).family("hippocampus").resolve("1.0-fast")
    assert version.uncertainty == {"threshold": 0.5} and version.validated_input == {"modality": ["MR"]}
    other = ModelRegistry.load(manifest).family("hippocampus").resolve("1.0")
    assert other.uncertainty == yaml.safe_load(text)["families"]["hippocampus"]["versions"]["1.0"]["uncertainty"]
