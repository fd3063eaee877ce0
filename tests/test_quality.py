"""models.quality (input checks, uncertainty, the flag) and models.calibrate (threshold, manifest blocks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from models.calibrate import choose_threshold, derive_validated_input, figures, replace_blocks, tolerated
from models.quality import (
    DISAGREEMENT,
    SOFT_BOUNDARY,
    assess,
    check_input,
    in_series_order,
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
    assert ("input: voxel_size_mm (left-right x posterior-anterior x inferior-superior) 0.5 x 1 x 1 mm outside the "
            "validated range 1 to 1 mm") in quality["reasons"]
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
        ("uncertainty: unsure on 30.0% of the voxels that may be Posterior, above the calibrated 20.0%; "
         "method: member disagreement")]


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
    # a 1-1 split of the mean is labelled background (the first class): 16 unsure over the 64 voxels some member
    # labels A (48 the mean labels A, and the 16 it does not)
    assert per["A"]["unsure_fraction"] == pytest.approx(16 / 64, abs=1e-4) and per["A"]["volume_spread_mm3"] == 32.0
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


def test_unsure_fraction_is_a_share_even_when_the_mean_labels_almost_nothing():
    """Issue 37: an inverted-contrast crop had members disagreeing on 957 voxels the mean labelled none of, and
    reported unsure_fraction 957.0; it is a share of the voxels that may be the structure, at most 1."""
    shape = (3, 20, 20, 20)
    first, second = np.zeros(shape), np.zeros(shape)
    first[0], second[0] = 1.0, 1.0
    first[0, :10], first[1, :10] = 0.0, 1.0  # member 1 calls half the volume A; member 2 calls none of it
    method, per = structure_uncertainty([first, second], {"A": 1}, 1.0)
    assert per["A"]["unsure_fraction"] == 1.0  # 4,000 unsure voxels, every voxel that may be A
    soft = np.zeros(shape)
    soft[0], soft[1, :10] = 0.7, 0.3
    soft[0, :10] = 0.7
    method, per = structure_uncertainty([soft], {"A": 1}, 1.0)  # unsure everywhere, labelled nowhere
    assert method == SOFT_BOUNDARY and per["A"]["unsure_fraction"] == 1.0
    empty = np.zeros(shape)
    empty[0] = 1.0
    assert structure_uncertainty([empty], {"A": 1}, 1.0)[1]["A"]["unsure_fraction"] == 0.0


def training_like_rows(n=60):
    """Training-style cases on three intensity scales (as the MSD Task04 volumes are), plus one outlier."""
    rows, cases = [], []
    for i in range(n):
        scale = (60.0, 500.0, 230000.0)[i % 3] * (1 + 0.1 * ((i * 7) % 5 - 2) / 2)
        rows.append(input_properties(crop((31 + i % 10, 45, 30), scale, i), [1.0, 1.0, 1.0], np.eye(4), "MR"))
        cases.append(f"case_{i:03d}")
    odd = input_properties(crop((35, 45, 30), 500.0, 99), [1.0, 1.0, 1.0], np.eye(4), "MR")
    odd["intensity_cv"] = 2.5
    return [*rows, odd], [*cases, "case_odd"]


def test_derived_ranges_are_robust_bands_with_outliers_named():
    rows, cases = training_like_rows()
    block = derive_validated_input(rows, cases, {"min": 0.9, "max": 1.1})
    assert block["matrix"] == {"min": [31, 45, 30], "max": [40, 45, 30]}
    assert len(block["intensity_mean"]["bands"]) == 3  # one per intensity scale, not 50 to 280,000
    assert block["outliers_excluded"] == {"case_odd": "intensity_cv 2.5"}
    assert block["intensity_cv"]["max"] < 1.0
    assert sum(all(c["passed"] for c in check_input(r, block)) for r in rows) >= 0.9 * len(rows)
    study = input_properties(crop((35, 45, 30), mean=500.0, seed=5), [1.0, 1.0, 1.0], np.eye(4), "MR")
    assert all(c["passed"] for c in check_input(study, block))
    for factor in (50, 1 / 50):  # pixel values x50 (RescaleSlope 50), or the reverse: flagged
        scaled = {**study, "intensity_mean": study["intensity_mean"] * factor}
        [failed] = [c for c in check_input(scaled, block) if not c["passed"]]
        assert failed["check"] == "intensity_mean"
        quality = assess(scaled, SOFT_BOUNDARY, {"A": {"unsure_fraction": 0.0, "volume_spread_mm3": 0}}, block,
                         CALIBRATION, "hippocampus 1.0")
        assert any(r.startswith("input: intensity_mean") and "outside the validated ranges" in r
                   for r in quality["reasons"])


def test_voxel_size_tolerance_is_the_widest_range_keeping_dice():
    measured = {0.85: 0.86, 0.9: 0.895, 0.95: 0.90, 1.0: 0.901, 1.05: 0.90, 1.1: 0.889, 1.15: 0.895}
    assert tolerated(measured, 0.01) == (0.9, 1.05)  # 1.15 is within again, but beyond a size that failed
    assert tolerated(measured, 0.003) == (0.95, 1.05)


@pytest.mark.parametrize("version", ["1.0", "1.0-fast", "1.1", "1.2"])
def test_shipped_ranges_pass_harmless_geometry_and_flag_a_rescaled_study(version):
    """Issue 37: 0.98 mm voxels were flagged (validated 1.0 to 1.0) and pixel values x50 passed (53 to 285,426)."""
    validated = ModelRegistry.load(PROJECT_ROOT / "models" / "manifest.yaml").family("hippocampus") \
        .resolve(version).validated_input
    study = input_properties(crop(mean=420.0), [0.98, 0.98, 1.0], np.eye(4), "MR")  # Study1's crop: mean ~420
    assert all(c["passed"] for c in check_input(study, validated)), check_input(study, validated)
    for harmful in ({"voxel_size_mm": [2.0, 2.0, 1.0]}, {"intensity_mean": 50 * 420.0}):
        assert not all(c["passed"] for c in check_input({**study, **harmful}, validated))


def test_checks_are_told_in_the_series_axis_order():
    """Issue 37: the flag said [2.0, 2.0, 1.0] (RAS) where the report said slice x row x column 1 x 2 x 2."""
    ras = input_properties(crop((35, 50, 40)), [2.0, 2.0, 1.0], np.eye(4), "MR")
    # an axial series: slices run inferior-superior (RAS axis 2), rows posterior-anterior (1), columns left-right (0)
    props, rules = in_series_order(ras, VALIDATED, [2, 1, 0])
    assert props["voxel_size_mm"] == [1.0, 2.0, 2.0] and props["matrix"] == [40, 50, 35]
    assert props["axes"] == ["slice", "row", "column"] and rules["matrix"]["min"] == [24, 40, 31]
    quality = assess(props, SOFT_BOUNDARY, {"A": {"unsure_fraction": 0.0, "volume_spread_mm3": 0}}, rules,
                     CALIBRATION, "hippocampus 1.0")
    assert "input: voxel_size_mm (slice x row x column) 1 x 2 x 2 mm outside the validated range 1 to 1 mm" \
        in quality["reasons"]


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


def test_degraded_inputs_keep_image_and_label_on_one_grid_and_the_flag_figures_count_them():
    from models.degrade import DEGRADATIONS, resample
    from models.flag_quality import summary

    image = crop((30, 40, 30))
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 10:20, 10:20], label[10:20, 20:30, 10:20] = 1, 2
    for name, degrade in DEGRADATIONS.items():
        case = degrade(image, label)
        assert case.image.shape == case.label.shape, name
        assert set(np.unique(case.label)) <= {0, 1, 2}, name
    half = resample(image, label, (2.0, 2.0, 2.0))
    assert half.image.shape == (15, 20, 15) and half.spacing == (2.0, 2.0, 2.0)
    assert np.count_nonzero(half.label == 1) == pytest.approx(1000 / 8, rel=0.2)  # the same structure, 8x the voxel
    rows = [{"min_dice": 0.8, "flagged": True, "kinds": ["input"]}, {"min_dice": 0.8, "flagged": False, "kinds": []},
            {"min_dice": 0.9, "flagged": True, "kinds": ["uncertainty"]},
            {"min_dice": 0.95, "flagged": False, "kinds": []}]
    assert summary(rows, 0.85) == {"volumes": 4, "low_dice": 2, "low_dice_flagged": 1, "flagged": 2,
                                   "share_of_low_dice_flagged": 0.5, "share_flagged": 0.5, "flagged_by_input": 1,
                                   "flagged_by_uncertainty": 1}


def test_measured_volumes_are_flagged_again_with_the_manifests_blocks(tmp_path, capsys):
    """models.flag_quality --reuse: volumes measured once are flagged with the version's current blocks."""
    from models.flag_quality import main

    properties = input_properties(crop((35, 45, 30), mean=60.0), [1.0, 1.0, 1.0], np.eye(4), "MR")
    calm = {"Anterior": {"unsure_fraction": 0.01, "volume_spread_mm3": 0}}
    rows = [{"case": "a", "min_dice": 0.9, "dice": 0.92, "method": SOFT_BOUNDARY, "structures": calm,
             "properties": properties},
            {"case": "b", "min_dice": 0.7, "dice": 0.8, "method": SOFT_BOUNDARY, "structures": calm,
             "properties": {**properties, "intensity_mean": 50 * 60.0}},
            {"case": "c", "min_dice": 0.8, "dice": 0.85, "method": SOFT_BOUNDARY,
             "structures": {"Anterior": {"unsure_fraction": 0.9, "volume_spread_mm3": 9}}, "properties": properties}]
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"version": "1.0-fast", "per_case": {"as it is": rows}}))
    figures = main(["--version", "1.0-fast", "--reuse", str(measured)])
    assert figures["as it is"] == {"volumes": 3, "low_dice": 2, "low_dice_flagged": 2, "flagged": 2,
                                   "share_of_low_dice_flagged": 1.0, "share_flagged": 0.667, "flagged_by_input": 1,
                                   "flagged_by_uncertainty": 1}
    assert "| `1.0-fast` | as it is | 3 | 2 | 2 of 2 (100%) | 2 of 3 (67%) | 1 | 1 |" in capsys.readouterr().out
