r"""How good is the quality flag: the share of low-Dice results it flags and the share of all results it flags,
on a split as it is and on the same volumes deliberately degraded (``models.degrade``).

    python -m models.flag_quality --version 1.0 [--family hippocampus] [--data ../shared/data/hippocampus]
                                  [--split test] [--out FILE.json]

Each volume is run as the server runs the version (its members, mirrored passes, canvas) and flagged as the server
flags it (``models.quality.assess``: the input checks against the version's ``validated_input`` and the
uncertainty against its calibrated threshold). A low-Dice result is one whose lowest structure Dice is below the
version's ``uncertainty.low_dice``. Prints a Markdown table (one row per condition, then all degraded ones, then
everything) and, with ``--out``, the figures and every case as JSON; ``--reuse`` flags such a file's volumes
again with the manifest's current blocks, without running the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .data import dataset_pairs, load_pair
from .degrade import DEGRADATIONS, Degraded
from .evaluate import volume_metrics
from .quality import assess, input_properties, structure_uncertainty
from .registry import DEFAULT_MANIFEST, ModelRegistry, ModelVersion

CLEAN = "as it is"


def measure(segmenter, version: ModelVersion, case: Degraded) -> dict:
    """One volume segmented as the server would: lowest structure Dice, Dice, and what the flag rests on (the
    uncertainty per structure and the input properties), so it can be flagged again after a recalibration."""
    structures = {s.name: s.label for s in version.structures}
    members = segmenter.member_probabilities(case.image)
    labels = np.argmax(sum(members) / len(members), axis=0)
    metrics = volume_metrics(labels, case.label)
    method, per_structure = structure_uncertainty(members, structures, float(np.prod(case.spacing)))
    return {"min_dice": round(min(metrics["dice_anterior"], metrics["dice_posterior"]), 4),
            "dice": round(metrics["dice"], 4), "method": method, "structures": per_structure,
            "properties": input_properties(case.image, case.spacing, np.eye(4), "MR")}


def judge(version: ModelVersion, row: dict) -> dict:
    """A measured volume flagged as the server flags it (``assess`` with the version's blocks): flagged, and by
    which kinds of reason (input, uncertainty)."""
    quality = assess(row["properties"], row["method"], row["structures"], version.validated_input or None,
                     version.uncertainty or None, f"{version.family} {version.version}")
    kinds = sorted({reason.split(":")[0] for reason in quality["reasons"]})
    return {**row, "flagged": quality["flagged"], "kinds": kinds, "score": quality["uncertainty"]["score"]}


def summary(rows: list[dict], low_dice: float) -> dict:
    """Low-Dice results, how many of them are flagged, how many are flagged in all, and the shares."""
    low = [r for r in rows if r["min_dice"] < low_dice]
    caught = sum(r["flagged"] for r in low)
    flagged = sum(r["flagged"] for r in rows)
    return {"volumes": len(rows), "low_dice": len(low), "low_dice_flagged": caught, "flagged": flagged,
            "share_of_low_dice_flagged": round(caught / len(low), 3) if low else None,
            "share_flagged": round(flagged / len(rows), 3) if rows else None,
            "flagged_by_input": sum("input" in r["kinds"] for r in rows),
            "flagged_by_uncertainty": sum("uncertainty" in r["kinds"] for r in rows)}


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole}" + (f" ({100 * part / whole:.0f}%)" if whole else "")


def table(version: str, figures: dict[str, dict]) -> str:
    """The figures as Markdown rows of the model card's table."""
    header = ("| version | input | volumes | low-Dice | **low-Dice flagged** | **flagged** | by input check "
              "| by uncertainty |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for condition, f in figures.items():
        lines.append(f"| `{version}` | {condition} | {f['volumes']} | {f['low_dice']} | "
                     f"{_share(f['low_dice_flagged'], f['low_dice'])} | {_share(f['flagged'], f['volumes'])} | "
                     f"{f['flagged_by_input']} | {f['flagged_by_uncertainty']} |")
    return "\n".join(lines)


def measure_split(version: ModelVersion, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every volume of the split, as it is and degraded, measured (``measure``), by condition."""
    from .segmenter import HippocampusSegmenter, version_settings

    segmenter = HippocampusSegmenter.load(version.weights, **version_settings(version.inference))
    pairs = dataset_pairs(args.data)
    cases = [c for c in segmenter.split[args.split] if c in pairs][:args.max_volumes]
    conditions = {CLEAN: lambda image, label: Degraded(image, label, (1.0, 1.0, 1.0)),
                  **({} if args.as_it_is else DEGRADATIONS)}
    measured: dict[str, list[dict]] = {name: [] for name in conditions}
    for i, case in enumerate(cases):
        image, label = load_pair(*pairs[case])
        for name, degrade in conditions.items():
            measured[name].append({"case": case, **measure(segmenter, version, degrade(image, label))})
        if args.progress:
            print(f"\r[flag_quality] {i + 1}/{len(cases)}", end="", file=sys.stderr, flush=True)
    if args.progress:
        print(file=sys.stderr)
    return measured


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m models.flag_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", required=True, help="the version to measure, as in the manifest (e.g. 1.0)")
    ap.add_argument("--family", default="hippocampus")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/hippocampus"),
                    help="folder with images/ and labels/ (the MSD Task04 pairs)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--max-volumes", type=int, help="only the split's first N volumes (a slow version on a busy "
                                                    "machine)")
    ap.add_argument("--as-it-is", action="store_true", help="only the split as it is, no degraded copies")
    ap.add_argument("--out", type=Path, help="write the figures and every case here as JSON")
    ap.add_argument("--reuse", type=Path, help="flag the volumes measured in an earlier --out file again with the "
                                               "manifest's current blocks (after a recalibration), without running "
                                               "the model")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.reuse and not (args.data / "images").is_dir():
        ap.error(f"{args.data}/images not found: give --data, the folder of the MSD Task04 images/ and labels/")

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    version = ModelRegistry.load(args.manifest).family(args.family).resolve(args.version)
    if not version.uncertainty:
        ap.error(f"{args.family} {args.version} has no uncertainty block: calibrate it first (models.calibrate)")
    if args.reuse and json.loads(args.reuse.read_text())["version"] != args.version:
        ap.error(f"{args.reuse} holds another version's volumes")
    if args.reuse:
        measured = json.loads(args.reuse.read_text())["per_case"]
    else:
        measured = measure_split(version, args)
    per_case = {name: [judge(version, row) for row in rows] for name, rows in measured.items()}
    low_dice = float(version.uncertainty["low_dice"])
    figures = {name: summary(rows, low_dice) for name, rows in per_case.items()}
    degraded = [r for name, rows in per_case.items() if name != CLEAN for r in rows]
    if degraded:
        figures["all degraded"] = summary(degraded, low_dice)
        figures["all"] = summary(degraded + per_case[CLEAN], low_dice)
    print(table(args.version, figures))
    if args.out:
        args.out.write_text(json.dumps({"family": args.family, "version": args.version, "split": args.split,
                                        "max_volumes": args.max_volumes,
                                        "low_dice": low_dice, "figures": figures, "per_case": per_case}))
    return figures


if __name__ == "__main__":
    main()
