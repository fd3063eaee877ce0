r"""Evaluate hippocampus segmentation weights on NIfTI image/label pairs.

Examples (from the repository root):

    # any folder pair, files matched by name
    python -m models.evaluate --images ../shared/data/hippocampus/images \
        --labels ../shared/data/hippocampus/labels
    # the held-out test split used for the model card (split seed from the checkpoint)
    python -m models.evaluate --data ../shared/data/hippocampus --split test
    # an explicit case list (text file, one id per line, or a metrics JSON's test split)
    python -m models.evaluate --data ../shared/data/hippocampus --cases models/hippocampus_unet.metrics.json
    # a version that reuses the weights with other inference settings: member 2 alone, no mirrored pass
    python -m models.evaluate --data ../shared/data/hippocampus --split test --members 2 --no-flip
    # the 1.0-fast version: member 0 alone, no mirrored pass, slices padded to a multiple of 8
    python -m models.evaluate --data ../shared/data/hippocampus --split test --members 0 --no-flip --canvas tight

    # a registry version, with exactly the inference settings models/manifest.yaml declares for it
    python -m models.evaluate --version 1.0-fast --data ../shared/data/hippocampus --split test
    # the family's default version (what the server runs when a request names none)
    python -m models.evaluate --version --data ../shared/data/hippocampus --split test

Without ``--version``, ``--weights``, ``--members``, ``--no-flip`` or ``--canvas`` the family's default
version is evaluated; those four flags evaluate a checkpoint with settings of your own instead and
cannot be combined with ``--version``.

Prints one JSON line.  Dice/Jaccard of two empty masks is defined as 1.0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .data import dataset_pairs, list_pairs, load_pair, split_cases

CLASS_NAMES = {1: "anterior", 2: "posterior"}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice = 2|P n T| / (|P| + |T|) of two boolean masks; 1.0 if both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard = |P n T| / |P u T| of two boolean masks; 1.0 if both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union


def volume_metrics(pred: np.ndarray, label: np.ndarray) -> dict:
    """Foreground (label > 0) Dice/Jaccard plus per-class Dice of one volume."""
    out = {"dice": dice(pred > 0, label > 0), "jaccard": jaccard(pred > 0, label > 0)}
    for k, name in CLASS_NAMES.items():
        out[f"dice_{name}"] = dice(pred == k, label == k)
    return out


def summarize(per_volume: list[dict]) -> dict:
    def mean(key):
        return float(np.mean([r[key] for r in per_volume])) if per_volume else float("nan")

    return {
        "n": len(per_volume),
        "mean_dice": mean("dice"),
        "mean_jaccard": mean("jaccard"),
        "dice_anterior": mean("dice_anterior"),
        "dice_posterior": mean("dice_posterior"),
        "per_volume": per_volume,
    }


def evaluate_pairs(pairs: dict, segment, cases: list[str] | None = None, progress: bool = False) -> dict:
    """Run ``segment(volume) -> labels`` over pairs ({case: (image, label)})."""
    cases = list(pairs) if cases is None else list(cases)
    rows = []
    for i, c in enumerate(cases):
        image, label = load_pair(*pairs[c])
        pred = segment(image)
        rows.append({"case": c, **{k: round(v, 6) for k, v in volume_metrics(pred, label).items()}})
        if progress:
            print(f"\r[evaluate] {i + 1}/{len(cases)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return summarize(rows)


def read_case_list(path: str | Path, split: str = "test") -> list[str]:
    """Case ids from a text file (one per line) or a metrics JSON (``split`` list)."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return list(json.loads(text)["split"][split])
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def member_list(text: str) -> list[int]:
    """``--members`` value: comma-separated member indices such as ``0,2``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated member indices such as 0,2, got {text!r}") from None


def registry_version(ap: argparse.ArgumentParser, manifest: str | None, family: str, name: str | None):
    """The registry's ``family`` version ``name`` (default version when None), its weights' SHA-256 checked;
    an argparse error naming the available versions or the damaged file otherwise."""
    from .registry import DEFAULT_MANIFEST, ManifestError, ModelRegistry, UnknownModel

    try:
        version = ModelRegistry.load(manifest or DEFAULT_MANIFEST).family(family).resolve(name)
        version.verify()
    except (ManifestError, UnknownModel) as exc:
        ap.error(str(exc))
    return version


def main(argv: list[str] | None = None) -> dict:
    from .runtime import BACKENDS
    from .segmenter import CANVASES

    ap = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="folder of image NIfTI files")
    ap.add_argument("--labels", help="folder of label NIfTI files (same file names)")
    ap.add_argument("--data", help="folder with images/ and labels/ (alternative to --images/--labels)")
    ap.add_argument("--split", choices=["train", "val", "test"],
                    help="restrict to a split of --data (case ids stored in the checkpoint, or recomputed with --seed)")
    ap.add_argument("--seed", type=int, help="split seed (default: the one stored in the checkpoint)")
    ap.add_argument("--cases", help="text file of case ids or a metrics JSON (uses its test split)")
    ap.add_argument("--max-cases", type=int, help="evaluate only the first N selected cases")
    ap.add_argument("--version", nargs="?", const="", default=None, metavar="V",
                    help="a version of the registry's family, run with the manifest's inference settings and "
                    "its weights checked against their SHA-256 (no value: the family's default version)")
    ap.add_argument("--family", default="hippocampus", help="registry family of --version (default %(default)s)")
    ap.add_argument("--manifest", help="registry manifest (default models/manifest.yaml)")
    ap.add_argument("--weights", help="checkpoint path (default models/hippocampus_unet.pt)")
    ap.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: CUDA when available)")
    ap.add_argument("--members", type=member_list, metavar="I[,J...]",
                    help="indices of the checkpoint's networks to run, comma-separated (default: all)")
    ap.add_argument("--no-flip", action="store_true", help="skip the left-right mirrored pass of every network")
    ap.add_argument("--canvas", choices=CANVASES, default=None,
                    help="fixed: slices padded to the training size (64 x 64); tight: to the next multiple of 8")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="auto: ONNX Runtime on the CPU when installed, else PyTorch (same labels)")
    ap.add_argument("--progress", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from .segmenter import HippocampusSegmenter, version_settings

    if args.data:
        pairs = dataset_pairs(args.data)
    elif args.images and args.labels:
        pairs = list_pairs(args.images, args.labels)
    else:
        ap.error("give --images and --labels, or --data")
    own = [flag for flag, given in (("--weights", args.weights), ("--members", args.members),
                                    ("--no-flip", args.no_flip), ("--canvas", args.canvas)) if given]
    if own and args.version is not None:
        ap.error(f"--version runs the settings the manifest declares for it; drop {', '.join(own)} "
                 "(or drop --version to evaluate a checkpoint with settings of your own)")
    version = None if own else registry_version(ap, args.manifest, args.family, args.version or None)
    try:
        if version is not None:
            seg = HippocampusSegmenter.load(version.weights, device=args.device, backend=args.backend,
                                            **version_settings(version.inference))
        else:
            seg = HippocampusSegmenter.load(args.weights, device=args.device, members=args.members,
                                            flips=not args.no_flip, backend=args.backend,
                                            canvas=args.canvas or "fixed")
    except ValueError as exc:  # members out of range, onnxruntime asked for on a GPU
        ap.error(str(exc))
    cases = list(pairs)
    if args.split:
        trained_on = {name for _, cfg in seg.members for name in cfg.get("trained_on", ["train"])}
        if args.split in trained_on:
            print(f"warning: the weights were trained on the {args.split} split; these figures are not held out",
                  file=sys.stderr)
        if args.seed is None and seg.split:
            # the split stored in the checkpoint at training time
            cases = [c for c in seg.split[args.split] if c in pairs]
        else:
            seed = args.seed if args.seed is not None else int(seg.config.get("split_seed", 0))
            fractions = tuple(seg.config.get("split_fractions", (0.7, 0.15, 0.15)))
            cases = split_cases(cases, seed, fractions)[args.split]
    if args.cases:
        wanted = read_case_list(args.cases)
        missing = [c for c in wanted if c not in pairs]
        if missing:
            ap.error(f"cases not found: {missing[:5]}")
        cases = [c for c in wanted if c in set(cases)]
    if args.max_cases is not None:
        cases = cases[: args.max_cases]
    result = evaluate_pairs(pairs, seg.segment, cases, progress=args.progress)
    if version is not None:
        result["model"] = version.provenance.as_json()
    result["weights_version"] = seg.version
    result["inference"] = {"members": list(seg.member_indices), "flips": seg.flips, "canvas": seg.canvas,
                           "backend": seg.backend}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
