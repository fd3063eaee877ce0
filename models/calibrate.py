r"""Derive a version's quality blocks from the data it was trained and validated on, and check them on the test split.

    python -m models.calibrate --version 1.0 [--family hippocampus] [--data ../shared/data/hippocampus] [--write]

1. ``validated_input``: from the training split's input properties (``models.quality.input_properties``):
   the intensity mean's bands (one per intensity scale of the data) and the coefficient of variation's range,
   robust (Tukey's fences: quartiles +- 1.5 interquartile ranges; outliers named in ``outliers_excluded``); the
   crop matrix's extremes per axis; the voxel size's tolerance, measured: the widest range of sizes around 1 mm
   at which training volumes resampled to that size keep the mean Dice within 0.01 of 1 mm's
   (``spacing_tolerance``); no obliquity.
2. ``uncertainty``: the version run on the validation split; the threshold on the uncertainty score that
   best separates volumes whose lowest structure Dice is below ``--low-dice`` (Youden's J, among thresholds
   flagging at most ``--max-flagged`` of the split; the higher threshold on a tie), then the test split's
   figures with that threshold: how many low-Dice volumes it flags, how many it flags in all; and
   ``test_twofold``, the same rule with each half of the test split thresholded on the other half (held out
   even when the weights were trained on the validation split, as the shipped ones were).
3. ``drift_reference``: a JSON file next to the manifest with the training split's histograms of the input
   properties and label volumes, and the validation split's of the uncertainty score (``models.monitoring``).

Prints the blocks as YAML; ``--write`` also puts them into the manifest's version (replacing earlier ones)
and writes the reference file. Runs the version as the server does (its members, mirrored passes, canvas).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from .data import dataset_pairs, load_pair
from .evaluate import volume_metrics
from .monitoring import BUCKETS, bucket_counts, watched_values
from .quality import input_properties, structure_uncertainty, uncertainty_score
from .registry import DEFAULT_MANIFEST, ModelRegistry, ModelVersion

#: Where the training data's voxels sit: the MSD Task04 NIfTI files have an identity affine (RAS, 1 mm).
TRAINING_MODALITY = "MR"


def case_properties(image: np.ndarray, zooms) -> dict:
    """The input properties of a training case as nibabel loads it (already in the model's orientation)."""
    return input_properties(image, [float(z) for z in zooms], np.eye(4), TRAINING_MODALITY)


#: Robust ranges (Tukey's fences): a group's values beyond its quartiles by more than ``FENCE`` times the
#: interquartile range are outliers (named in the block and the model card, left out); the range is the fences.
FENCE = 1.5
#: The training split's intensity scales differ by orders of magnitude between acquisitions (about 50-75,
#: 300-850 and 160,000-290,000): sorted means further apart than this factor start another band.
BAND_GAP = 2.0
#: The voxel sizes (mm, isotropic) at which the tolerance of the voxel-size check is measured, and the largest
#: loss of mean Dice against 1 mm that a size may cost to lie within it.
TOLERANCE_SPACINGS = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)
MAX_DICE_LOSS = 0.01


def robust_range(values: dict[str, float], log: bool = False) -> tuple[dict, dict[str, float]]:
    """The fences ``{"min", "max"}`` of the values (by case): the quartiles widened by ``FENCE`` interquartile
    ranges (``log``: on log10, for values spanning a scale); and the cases outside them (outliers)."""
    x = np.array(list(values.values()), float)
    judged = np.log10(x) if log else x
    q1, q3 = np.percentile(judged, [25, 75])
    low, high = q1 - FENCE * (q3 - q1), q3 + FENCE * (q3 - q1)
    outliers = {c: v for c, v, j in zip(values, x, judged, strict=True) if not low <= j <= high}
    if log:
        low, high = 10**low, 10**high
    return {"min": float(low), "max": float(high)}, {c: float(v) for c, v in outliers.items()}


def _rounded(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (a manifest stays readable)."""
    return float(f"{value:.{digits}g}")


def intensity_bands(means: dict[str, float]) -> tuple[list[dict], dict[str, float]]:
    """The validated bands of the intensity mean: the training means grouped by scale (``BAND_GAP``), each group's
    fences on a log scale; groups of fewer than 5 % of the cases are outliers, as are each group's own."""
    ordered = sorted(means, key=means.get)
    groups: list[list[str]] = [[ordered[0]]]
    for previous, case in zip(ordered, ordered[1:], strict=False):
        if means[case] > BAND_GAP * means[previous]:
            groups.append([])
        groups[-1].append(case)
    bands, outliers = [], {}
    for group in groups:
        if len(group) < 0.05 * len(means):
            outliers.update({c: means[c] for c in group})
            continue
        span, out = robust_range({c: means[c] for c in group}, log=True)
        bands.append({"min": _rounded(span["min"]), "max": _rounded(span["max"])})
        outliers.update(out)
    return bands, outliers


def derive_validated_input(rows: list[dict], cases: list[str] | None = None,
                           voxel_size: dict | None = None) -> dict:
    """The ``validated_input`` block from the training cases' properties (``rows``, of ``cases``): the intensity
    mean's bands and the coefficient of variation's robust range (``outliers`` named and left out), the matrix's
    extremes per axis (the model takes any crop size; these are the sizes it was shown), the voxel size's
    measured tolerance (``voxel_size``; the training extremes without one), no obliquity."""
    cases = cases or [str(i) for i in range(len(rows))]
    matrices = np.array([r["matrix"] for r in rows])
    sizes = [s for r in rows for s in r["voxel_size_mm"]]
    bands, mean_outliers = intensity_bands({c: r["intensity_mean"] for c, r in zip(cases, rows, strict=True)})
    cv, cv_outliers = robust_range({c: r["intensity_cv"] for c, r in zip(cases, rows, strict=True)})
    outliers = {**{c: f"intensity_mean {v:g}" for c, v in mean_outliers.items()},
                **{c: f"intensity_cv {v:g}" for c, v in cv_outliers.items()}}
    block = {
        "modality": [TRAINING_MODALITY],
        "voxel_size_mm": voxel_size or {"min": round(min(sizes), 4), "max": round(max(sizes), 4)},
        "matrix": {"min": matrices.min(axis=0).tolist(), "max": matrices.max(axis=0).tolist()},
        "intensity_mean": {"bands": bands},
        "intensity_cv": {"min": round(cv["min"], 4), "max": round(cv["max"], 4)},
        "obliquity_deg": {"max": round(max(r["obliquity_deg"] for r in rows), 3)},
    }
    if outliers:
        block["outliers_excluded"] = dict(sorted(outliers.items()))
    return block


def tolerated(measured: dict[float, float], max_loss: float = MAX_DICE_LOSS) -> tuple[float, float]:
    """The widest range of sizes around 1 mm whose every measured size (``measured``: mean Dice by size) keeps the
    mean Dice within ``max_loss`` of 1 mm's; a size beyond a failing one is not reached."""
    reference, low, high = measured[1.0], 1.0, 1.0
    for size in sorted((s for s in measured if s < 1.0), reverse=True):
        if reference - measured[size] > max_loss:
            break
        low = size
    for size in sorted(s for s in measured if s > 1.0):
        if reference - measured[size] > max_loss:
            break
        high = size
    return low, high


def spacing_tolerance(segment, pairs: dict, cases: list[str], spacings=TOLERANCE_SPACINGS,
                      max_loss: float = MAX_DICE_LOSS, progress: bool = False) -> tuple[dict, dict]:
    """The voxel sizes the model handles: ``cases`` (training volumes) resampled to each isotropic size of
    ``spacings`` and segmented (``segment(image) -> labels``); the widest range around 1 mm whose every measured
    size keeps the mean Dice within ``max_loss`` of 1 mm's. Returns the ``voxel_size_mm`` rule and the measurements."""
    from .degrade import resample
    from .evaluate import volume_metrics

    measured = {}
    for k, size in enumerate(spacings):
        scores = []
        for case in cases:
            image, label = load_pair(*pairs[case])
            case_ = resample(image, label, (size,) * 3) if size != 1.0 else None
            pred = segment(case_.image if case_ else image)
            scores.append(volume_metrics(pred, case_.label if case_ else label)["dice"])
        measured[size] = round(float(np.mean(scores)), 4)
        if progress:
            print(f"\r[calibrate] voxel sizes {k + 1}/{len(spacings)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    low, high = tolerated(measured, max_loss)
    rule = {"min": low, "max": high,
            "tolerance_from": f"mean Dice of {len(cases)} training volumes resampled to {min(spacings)}-"
                              f"{max(spacings)} mm within {max_loss} of 1 mm's",
            "dice_by_size": {f"{s:g}": measured[s] for s in spacings}}
    return rule, measured


def choose_threshold(scores: list[float], low: list[bool], max_flagged: float) -> float:
    """The threshold (flag when score > it) with the best Youden's J among those flagging at most ``max_flagged``
    of these cases (the higher threshold on a tie); the highest score when no case is low."""
    if not any(low) or all(low):
        return float(max(scores))
    best, best_j = float(max(scores)), -1.0
    for t in sorted(set(scores), reverse=True):  # from fewest flags to most: a tie keeps the higher threshold
        flagged = [s > t for s in scores]
        if sum(flagged) > max_flagged * len(scores):
            break
        tpr = sum(f and lo for f, lo in zip(flagged, low, strict=True)) / sum(low)
        fpr = sum(f and not lo for f, lo in zip(flagged, low, strict=True)) / (len(low) - sum(low))
        if tpr - fpr > best_j:
            best, best_j = t, tpr - fpr
    return best


def figures(scores: list[float], low: list[bool], threshold: float) -> dict:
    """How the flag does on a split: low-Dice volumes, how many of them are flagged, how many are flagged in all."""
    flagged = [s > threshold for s in scores]
    n_low, n_flagged = sum(low), sum(flagged)
    caught = sum(f and lo for f, lo in zip(flagged, low, strict=True))
    return {"volumes": len(scores), "low_dice": n_low, "low_dice_flagged": caught, "flagged": n_flagged,
            "share_of_low_dice_flagged": round(caught / n_low, 3) if n_low else None,
            "share_flagged": round(n_flagged / len(scores), 3),
            "share_of_flagged_low_dice": round(caught / n_flagged, 3) if n_flagged else None}


def twofold(scores: list[float], low: list[bool], max_flagged: float) -> dict:
    """Test figures with each half's threshold chosen on the other half (alternate cases): a held-out check
    of the threshold rule when the validation split is not held out from the weights."""
    flagged = [False] * len(scores)
    for fold in (0, 1):
        pick = [i for i in range(len(scores)) if i % 2 != fold]
        threshold = choose_threshold([scores[i] for i in pick], [low[i] for i in pick], max_flagged)
        for i in range(fold, len(scores), 2):
            flagged[i] = scores[i] > threshold
    caught, n_low, n_flagged = sum(f and lo for f, lo in zip(flagged, low, strict=True)), sum(low), sum(flagged)
    return {"volumes": len(scores), "low_dice": n_low, "low_dice_flagged": caught, "flagged": n_flagged,
            "share_of_low_dice_flagged": round(caught / n_low, 3) if n_low else None,
            "share_flagged": round(n_flagged / len(scores), 3),
            "share_of_flagged_low_dice": round(caught / n_flagged, 3) if n_flagged else None}


def run_split(segmenter, version: ModelVersion, pairs: dict, cases: list[str], progress: bool) -> list[dict]:
    """Per case: the uncertainty score, per-structure figures, lowest structure Dice and predicted volume."""
    structures = {s.name: s.label for s in version.structures}
    rows = []
    for i, case in enumerate(cases):
        image, label = load_pair(*pairs[case])
        members = segmenter.member_probabilities(image)
        method, per_structure = structure_uncertainty(members, structures, 1.0)
        labels = np.argmax(sum(members) / len(members), axis=0)
        metrics = volume_metrics(labels, label)
        rows.append({"case": case, "score": uncertainty_score(per_structure), "method": method,
                     "min_dice": min(metrics["dice_anterior"], metrics["dice_posterior"]), "dice": metrics["dice"],
                     "structures": per_structure})
        if progress:
            print(f"\r[calibrate] {i + 1}/{len(cases)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return rows


def replace_blocks(manifest_text: str, family: str, version: str, blocks: dict) -> str:
    """The manifest with ``blocks`` as the version's keys (earlier ones of the same names replaced); comments kept."""
    lines = manifest_text.splitlines()
    in_family, start = False, None
    for i, line in enumerate(lines):
        if line.rstrip() == f"  {family}:":
            in_family = True
        elif in_family and line.strip().strip("'\":") == version and line.startswith("      ") \
                and not line.startswith("       ") and line.rstrip().endswith(":"):
            start = i
            break
    if start is None:
        raise SystemExit(f"version {version} of {family} not found in the manifest")
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > 6):
        end += 1
    body, skipping = [], False
    for line in lines[start + 1:end]:
        indent = len(line) - len(line.lstrip())
        if indent == 8 and line.strip():
            skipping = line.strip().split(":")[0] in blocks
        if not skipping:
            body.append(line)
    while body and not body[-1].strip():
        body.pop()
    text = yaml.safe_dump(blocks, sort_keys=False, width=110, default_flow_style=None)
    body += ["        " + t if t else t for t in text.splitlines()]
    return "\n".join([*lines[:start + 1], *body, *lines[end:]]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m models.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", required=True, help="the version to calibrate, as in the manifest (e.g. 1.0)")
    ap.add_argument("--family", default="hippocampus")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/hippocampus"),
                    help="folder with images/ and labels/ (the MSD Task04 pairs)")
    ap.add_argument("--low-dice", type=float, default=0.85, help="a volume whose lowest structure Dice is below "
                                                                  "this is a case the flag should find")
    ap.add_argument("--max-flagged", type=float, default=0.25,
                    help="largest share of the validation split the threshold may flag (a review queue must stay "
                         "short; default 0.25)")
    ap.add_argument("--tolerance-volumes", type=int, default=20,
                    help="training volumes resampled to each voxel size to measure the voxel-size tolerance (the "
                         "first of the training split; default 20)")
    ap.add_argument("--write", action="store_true", help="write the blocks into the manifest and the reference file")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if not (args.data / "images").is_dir():
        ap.error(f"{args.data}/images not found: give --data, the folder of the MSD Task04 images/ and labels/")

    import torch

    from .segmenter import HippocampusSegmenter

    torch.set_num_threads(min(2, torch.get_num_threads()))
    version = ModelRegistry.load(args.manifest).family(args.family).resolve(args.version)
    members = version.inference.get("members", "all")
    segmenter = HippocampusSegmenter.load(version.weights, members=None if members == "all" else list(members),
                                          flips=bool(version.inference.get("flips", True)),
                                          canvas=str(version.inference.get("canvas", "fixed")))
    if not segmenter.split:
        ap.error(f"{version.weights.name} stores no train/val/test split; calibration needs the one it was trained on")
    pairs = dataset_pairs(args.data)
    split = {name: [c for c in cases if c in pairs] for name, cases in segmenter.split.items()}

    train_props, train_volumes = [], []
    for case in split["train"]:
        image, label = load_pair(*pairs[case])
        train_props.append(case_properties(image, (1.0, 1.0, 1.0)))
        train_volumes.append(float(np.count_nonzero(label)))  # 1 mm voxels
    tolerance_cases = split["train"][:args.tolerance_volumes]
    voxel_size, _ = spacing_tolerance(segmenter.segment, pairs, tolerance_cases, progress=args.progress)
    validated = derive_validated_input(train_props, split["train"], voxel_size)
    command = f"python -m models.calibrate --version {args.version}" + "".join(
        f" --{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("low_dice", "max_flagged", "tolerance_volumes") if getattr(args, name) != ap.get_default(name))
    validated["derived_from"] = f"train split ({len(train_props)} volumes), by {command}"

    val = run_split(segmenter, version, pairs, split["val"], args.progress)
    test = run_split(segmenter, version, pairs, split["test"], args.progress)
    threshold = choose_threshold([r["score"] for r in val], [r["min_dice"] < args.low_dice for r in val],
                                 args.max_flagged)
    test_scores, test_low = [r["score"] for r in test], [r["min_dice"] < args.low_dice for r in test]
    val_trained = any("val" in cfg.get("trained_on", ["train"]) for _, cfg in segmenter.members)
    if val_trained:
        print(f"warning: {version.weights.name} was trained on the validation split too: its uncertainty there is "
              "lower than on new data, so the threshold flags more on the test split than on validation",
              file=sys.stderr)
    uncertainty = {
        "method": val[0]["method"], "threshold": round(threshold, 4),
        "score": "largest unsure fraction over the structures",
        "low_dice": args.low_dice, "max_flagged": args.max_flagged,
        "low_dice_means": "the volume's lowest structure Dice",
        "validation": figures([r["score"] for r in val], [r["min_dice"] < args.low_dice for r in val], threshold),
        "validation_in_training": val_trained,
        "test": figures(test_scores, test_low, threshold),
        "test_twofold": twofold(test_scores, test_low, args.max_flagged),
        "command": command, "date": datetime.date.today().isoformat(),
    }
    reference_name = f"drift/{args.family}-{args.version}.json"
    observed: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for props, volume in zip(train_props, train_volumes, strict=True):
        for name, value in watched_values(props, volume, None).items():
            observed[name].append(value)
    observed["uncertainty"] = [r["score"] for r in val]
    reference = {"family": args.family, "version": args.version, "command": command,
                 "sources": {"uncertainty": f"validation split ({len(val)} volumes)",
                             "total_volume_mm3": f"training split label volumes ({len(train_volumes)})",
                             "others": f"training split input properties ({len(train_props)})"},
                 "expected_flagged_share": uncertainty["test"]["share_flagged"],
                 "histograms": {name: bucket_counts(name, values) for name, values in observed.items()},
                 "per_case": {"validation": val, "test": test}}
    blocks = {"validated_input": validated, "uncertainty": uncertainty, "drift_reference": reference_name}
    print(yaml.safe_dump(blocks, sort_keys=False, width=110, default_flow_style=None))
    if args.write:
        path = args.manifest.parent / reference_name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(reference, indent=1) + "\n")
        args.manifest.write_text(replace_blocks(args.manifest.read_text(), args.family, args.version, blocks))
        ModelRegistry.load(args.manifest)  # the manifest still parses
        print(f"wrote {args.manifest} ({args.family} {args.version}) and {path}", file=sys.stderr)
    return blocks


if __name__ == "__main__":
    main()
