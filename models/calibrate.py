r"""Derive a version's quality blocks from the data it was trained and validated on, and check them on the test split.

    python -m models.calibrate --version 1.0 [--family hippocampus] [--data ../shared/data/hippocampus] [--write]

1. ``validated_input``: the training split's input properties (``models.quality.input_properties``: voxel
   size, crop matrix per axis, intensity mean and coefficient of variation, obliquity), their min and max.
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


def derive_validated_input(rows: list[dict]) -> dict:
    """The ``validated_input`` block: each property's min and max over the training cases."""
    def span(key, digits=4):
        values = [r[key] for r in rows]
        return {"min": round(float(min(values)), digits), "max": round(float(max(values)), digits)}

    matrices = np.array([r["matrix"] for r in rows])
    sizes = [s for r in rows for s in r["voxel_size_mm"]]
    return {
        "modality": [TRAINING_MODALITY],
        "voxel_size_mm": {"min": round(min(sizes), 4), "max": round(max(sizes), 4)},
        "matrix": {"min": matrices.min(axis=0).tolist(), "max": matrices.max(axis=0).tolist()},
        "intensity_mean": span("intensity_mean", 1),
        "intensity_cv": span("intensity_cv"),
        "obliquity_deg": {"max": round(max(r["obliquity_deg"] for r in rows), 3)},
    }


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
    validated = derive_validated_input(train_props)
    command = f"python -m models.calibrate --version {args.version}"
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
