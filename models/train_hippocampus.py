r"""Train a hippocampus UNet (2.5D slices or 3D volumes) on MSD Task04 NIfTI pairs.

Usage (from the repository root):

    python -m models.train_hippocampus --data ../shared/data/hippocampus \
        --out models/hippocampus_unet.pt [--arch unet2.5d|unet3d --epochs N --seed S --max-volumes K]

Several trained networks (same split, e.g. different slicing axes) can be
merged into one checkpoint whose class probabilities are averaged:

    python -m models.train_hippocampus --data ../shared/data/hippocampus \
        --out models/hippocampus_unet.pt --combine sagittal.pt axial.pt [--select]

``--select`` keeps only the subset of members that scores best on the
validation split (see ``select_members``).  A combined checkpoint may itself
be given to ``--combine``: each of its networks becomes a candidate.

The split is by volume and deterministic in ``--seed``.  The checkpoint with
the best validation Dice is kept; after training it is evaluated on the test
split and ``<out stem>.metrics.json`` is written next to the weights.

``--include-val`` is the final refit once a recipe has been chosen on the
validation split: it trains on the training and validation volumes together
for the same budget and keeps the last epoch (nothing is held out to choose
another); the test split stays unseen.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from .data import augment_batch, augment_volumes, dataset_pairs, load_pair, load_samples, load_volumes, split_cases
from .evaluate import dice, evaluate_pairs
from .segmenter import (
    MODEL_NAME,
    HippocampusSegmenter,
    build_model,
    load_network,
    predict_ensemble,
    predict_probs_tta,
    predict_volume,
)

DEFAULTS = dict(epochs=30, seed=0, batch_size=32, lr=2e-3, weight_decay=1e-4, base=16, depth=4,
                dropout=0.1, axis=0, context=2, size=64, tta=True, arch="unet2.5d")
# the 3D network: every training volume (at most 43 x 58 x 47) fits the padded shape; each step
# trains on a random crop of it, which keeps the hippocampus and costs 40 % less than the whole
DEFAULTS_3D = dict(batch_size=2, dropout=0.0, shape=(48, 64, 48), crop=(40, 56, 40))
ARCHS = ("unet2.5d", "unet3d")


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int = 3) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes (batch-level; 2D or 3D)."""
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, n_classes).movedim(-1, 1).float()[:, 1:]
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    soft_dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1 - soft_dice.mean())


def ema_update(decay: float):
    """Moving-average step for ``AveragedModel``: the decay ramps up as (1 + n) / (10 + n) after n updates,
    capped at ``decay``, so the random initial weights do not linger in the average of a short run."""
    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return d * averaged + (1.0 - d) * current
    return update


def dice_fg(pred: np.ndarray, label: np.ndarray) -> float:
    return dice(pred > 0, label > 0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lr_at(step: int, progress: float, base_lr: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` in [0, 1]."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(data: str | Path, out: str | Path, epochs: int = DEFAULTS["epochs"], seed: int = DEFAULTS["seed"],
          max_volumes: int | None = None, max_steps: int | None = None, time_limit_min: float | None = None,
          batch_size: int | None = None, lr: float = DEFAULTS["lr"],
          weight_decay: float = DEFAULTS["weight_decay"], base: int = DEFAULTS["base"],
          depth: int = DEFAULTS["depth"], dropout: float | None = None, axis: int = DEFAULTS["axis"],
          context: int = DEFAULTS["context"], size: int = DEFAULTS["size"], tta: bool = DEFAULTS["tta"],
          threads: int = 2, skip_test: bool = False, include_val: bool = False,
          arch: str = DEFAULTS["arch"], ema: float | None = None) -> dict:
    """Train one network (``arch`` "unet2.5d": slices along ``axis``; "unet3d": whole volumes) and write
    the best checkpoint to ``out`` and its metrics JSON next to it; returns the metrics.

    With ``ema`` (a decay such as 0.999) an exponential moving average of the weights (and batch-norm
    statistics) is what gets validated and saved, instead of the raw weights of the last step.
    """
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"ema decay must be between 0 and 1, got {ema}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    three_d = arch == "unet3d"
    if batch_size is None:
        batch_size = DEFAULTS_3D["batch_size"] if three_d else DEFAULTS["batch_size"]
    if dropout is None:
        dropout = DEFAULTS_3D["dropout"] if three_d else DEFAULTS["dropout"]
    t_start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path_of(out)

    pairs = dataset_pairs(data)
    if not pairs:
        raise FileNotFoundError(f"no image/label pairs under {data}")
    cases = sorted(pairs)
    if max_volumes:
        cases = cases[:max_volumes]
    fractions = (0.7, 0.15, 0.15)
    split = split_cases(cases, seed, fractions)
    _log(f"[train] split seed={seed}: train={len(split['train'])} val={len(split['val'])} "
         f"test={len(split['test'])}")

    config = dict(arch=arch, n_classes=3, base=base, depth=depth, dropout=dropout, tta=tta,
                  normalisation="clip 0.5-99.5 percentile, z-score per volume",
                  split_seed=seed, split_fractions=list(fractions))
    if three_d:
        config.update(shape=list(DEFAULTS_3D["shape"]), crop=list(DEFAULTS_3D["crop"]))
    else:
        config.update(axis=axis, context=context, size=size)
    trained_on = ["train", "val"] if include_val else ["train"]
    config["trained_on"] = trained_on
    train_cases = [c for name in trained_on for c in split[name]]
    if three_d:
        x_np, y_np = load_volumes(pairs, train_cases, DEFAULTS_3D["shape"])
    else:
        x_np, y_np = load_samples(pairs, train_cases, axis, context, size)
    x_all, y_all = torch.from_numpy(x_np), torch.from_numpy(y_np)
    if include_val:
        _log("[train] --include-val: training on the training and validation splits; the test split stays unseen")
    # with --include-val nothing is held out: no per-epoch validation, the last epoch is kept
    val_data = [] if include_val else [load_pair(*pairs[c]) for c in split["val"]]
    _log(f"[train] {len(x_all)} training {'volumes' if three_d else 'slices'} of {tuple(x_all.shape[1:])}, loaded in "
         f"{time.time() - t_start:.1f}s")

    model = build_model(config)
    # the network that is validated and saved: the raw one, or the running average of its weights
    averaged = None if ema is None else AveragedModel(model, avg_fn=ema_update(ema), use_buffers=True)
    kept = model if averaged is None else averaged.module
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    gen = torch.Generator().manual_seed(seed)
    # left-right mirroring (volume axis 0) is label-safe; anterior/posterior (axis 1) is never flipped
    flip_dim = 1 if axis == 0 else 2

    def augment(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if three_d:
            return augment_volumes(xb, yb, DEFAULTS_3D["crop"], generator=gen)
        return augment_batch(xb, yb, generator=gen, flip_dim=flip_dim)

    history = []
    best = {"val_dice": -1.0, "epoch": 0, "state": None}
    step = 0
    stop = False
    train_t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        losses = []
        t_ep = time.time()
        for i in range(steps_per_epoch):
            # Progress through the run: by steps, or by wall time when a time limit is set
            # (the cosine schedule then ends at the time limit; see --time-limit).
            progress = step / total_steps
            if time_limit_min is not None:
                progress = max(progress, (time.time() - train_t0) / (time_limit_min * 60))
            if progress >= 1.0:
                stop = True
                break
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = augment(x_all[idx], y_all[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, progress, lr, warmup=min(100, total_steps // 10))
            opt.zero_grad(set_to_none=True)
            loss = dice_ce_loss(model(xb), yb)
            loss.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(model)
            losses.append(loss.item())
            step += 1
            if (i + 1) % 20 == 0 or i + 1 == steps_per_epoch:
                pct = 100.0 * progress
                print(f"\r[train] epoch {epoch}/{epochs} step {i + 1}/{steps_per_epoch} "
                      f"loss {np.mean(losses):.4f} ({pct:.0f}% of run)", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if not losses:  # budget used up exactly at an epoch boundary
            break
        kept.eval()
        with torch.inference_mode():
            vd = []
            for image, label in val_data:
                vd.append(dice_fg(predict_volume(kept, image, config, tta=False), label))
        val_dice = float(np.mean(vd)) if vd else None
        entry = {"epoch": epoch, "steps": step, "train_loss": float(np.mean(losses)) if losses else None,
                 "val_dice": None if val_dice is None else round(val_dice, 5),
                 "epoch_seconds": round(time.time() - t_ep, 1)}
        history.append(entry)
        # nothing held out (--include-val, or too few volumes): the latest epoch is kept
        improved = val_dice is None or best["state"] is None or val_dice > best["val_dice"]
        if improved:
            best = {"val_dice": val_dice, "epoch": epoch, "state": copy.deepcopy(kept.state_dict())}
            torch.save({"state_dict": best["state"], "config": config, "version": MODEL_NAME, "split": split,
                        "epoch": epoch, "val_dice": val_dice}, out)
        held_out = "(nothing held out), saved" if val_dice is None else f"val_dice {val_dice:.4f}" + \
            (" (best, saved)" if improved else "")
        _log(f"[train] epoch {epoch}: loss {entry['train_loss']:.4f} {held_out} [{entry['epoch_seconds']}s, "
             f"{(time.time() - train_t0) / 60:.1f} min total]")
        if stop:
            if time_limit_min is not None and step < total_steps:
                _log("[train] time limit reached")
            break
    train_seconds = time.time() - train_t0

    model.load_state_dict(best["state"])
    model.eval()
    if tta and val_data:
        # keep the left-right flip test-time augmentation only if it helps on the validation split
        def val_dice_with(flag: bool) -> float:
            return float(np.mean([dice_fg(predict_volume(model, im, config, tta=flag), lab)
                                  for im, lab in val_data]))
        plain, flipped = val_dice_with(False), val_dice_with(True)
        config["tta"] = flipped > plain
        _log(f"[train] val dice without/with flip TTA: {plain:.4f}/{flipped:.4f} -> tta={config['tta']}")
        torch.save({"state_dict": best["state"], "config": config, "version": MODEL_NAME, "split": split,
                    "epoch": best["epoch"], "val_dice": max(plain, flipped)}, out)
    test = None
    if not skip_test and split["test"]:
        test = evaluate_pairs(pairs, lambda v: predict_volume(model, v, config), split["test"])
        _log(f"[train] test split (best epoch {best['epoch']}): mean_dice {test['mean_dice']:.4f} "
             f"jaccard {test['mean_jaccard']:.4f} anterior {test['dice_anterior']:.4f} "
             f"posterior {test['dice_posterior']:.4f}")
    metrics = {
        "model": MODEL_NAME,
        "weights": out.name,
        "data": "Medical Segmentation Decathlon Task04_Hippocampus (CC-BY-SA 4.0)",
        "config": config,
        "training": {"epochs_requested": epochs, "epochs_run": len(history), "steps": step,
                     "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "optimizer": "AdamW, linear warm-up then cosine decay",
                     "loss": "cross-entropy + soft Dice (foreground classes)",
                     "max_volumes": max_volumes, "max_steps": max_steps, "time_limit_min": time_limit_min,
                     "threads": threads, "ema_decay": ema,
                     "train_seconds": round(train_seconds, 1),
                     "total_seconds": round(time.time() - t_start, 1),
                     "torch": torch.__version__, "python": platform.python_version()},
        "split": split,
        "split_counts": {k: len(v) for k, v in split.items()},
        "trained_on": trained_on,
        "best_epoch": best["epoch"],
        "best_val_dice": None if best["val_dice"] is None else round(best["val_dice"], 5),
        "history": history,
        "test": test,
        "dice_definition": "2|P n T|/(|P|+|T|) per volume, 1.0 when both masks are empty; "
                           "mean_dice uses foreground (label > 0)",
    }
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    _log(f"[train] wrote {out} and {metrics_path}")
    return metrics


def _describe(config: dict) -> str:
    """Short name of a network: "unet3d", or "unet2.5d axis N"."""
    return "unet3d" if config.get("arch") == "unet3d" else f"unet2.5d axis {config['axis']}"


def metrics_path_of(path: Path) -> Path:
    """The metrics JSON written beside checkpoint ``path`` (``<stem>.metrics.json``)."""
    return path.with_name(path.name.removesuffix(".pt") + ".metrics.json")


def _member_metrics(path: Path) -> dict | None:
    mp = metrics_path_of(path)
    if not mp.is_file():
        return None
    m = json.loads(mp.read_text())
    return {k: m.get(k) for k in ("config", "training", "best_epoch", "best_val_dice", "history", "test")}


def load_candidates(paths: list[str | Path]) -> list[dict]:
    """Networks of trained checkpoints: [{"name", "state_dict", "config", "split", "metrics"}].

    A combined checkpoint (``members``) contributes each of its networks, named
    and described as its metrics JSON recorded them, so a shipped ensemble can
    be a candidate list of its own next to newly trained networks.
    """
    found = []
    for p in map(Path, paths):
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        if "members" not in ckpt:
            found.append(dict(name=p.name, state_dict=ckpt["state_dict"], config=dict(ckpt["config"]),
                              split=ckpt["split"], metrics=_member_metrics(p)))
            continue
        mp = metrics_path_of(p)
        recorded = json.loads(mp.read_text()).get("members", []) if mp.is_file() else []
        for i, m in enumerate(ckpt["members"]):
            rec = recorded[i] if i < len(recorded) else {}
            found.append(dict(name=rec.get("file", f"{p.name}[{i}]"), state_dict=m["state_dict"],
                              config=dict(m["config"]), split=ckpt["split"], metrics=rec.get("metrics")))
    return found


MAX_SELECTION_CANDIDATES = 10  # 2**10 - 1 subsets; each costs one argmax per validation volume


def select_members(pairs: dict, cases: list[str], members: list[tuple[torch.nn.Module, dict]]) -> list[dict]:
    """Rank every non-empty subset of ``members`` by mean foreground Dice on ``cases``.

    Each network's probabilities are computed once; a subset's score is the
    Dice of the argmax of their average.  Ties go to the smaller subset (it
    is cheaper to serve).  Returns the five best: [{"members": [...], "val_dice": ...}],
    best first.
    """
    if not 1 <= len(members) <= MAX_SELECTION_CANDIDATES:
        raise ValueError(f"selection takes 1 to {MAX_SELECTION_CANDIDATES} candidates, got {len(members)}")
    labels, probs = [], []  # probs[case][member]: class probabilities with the member's own TTA
    for c in cases:
        image, label = load_pair(*pairs[c])
        labels.append(label)
        probs.append([predict_probs_tta(m, image, cfg) for m, cfg in members])

    def score(subset: tuple[int, ...]) -> float:
        return float(np.mean([dice_fg(np.argmax(sum(p[i] for i in subset), axis=0), lab)
                              for p, lab in zip(probs, labels, strict=True)]))

    subsets = [c for r in range(1, len(members) + 1) for c in itertools.combinations(range(len(members)), r)]
    ranked = sorted(((score(c), c) for c in subsets), key=lambda sc: (-sc[0], len(sc[1])))
    for value, subset in ranked[:5]:
        _log(f"[combine] selection: members {list(subset)} -> val dice {value:.4f}")
    return [{"members": list(subset), "val_dice": round(value, 5)} for value, subset in ranked[:5]]


def combine(data: str | Path, out: str | Path, member_paths: list[str | Path], threads: int = 2,
            select: bool = False) -> dict:
    """Merge trained checkpoints into one averaging checkpoint; evaluate it on val and test.

    With ``select`` only the best subset found by :func:`select_members` on
    the validation split is kept (the test split plays no part in the choice).
    When a member was refitted with ``--include-val`` the validation split is
    no longer held out: selection is refused and only the test split is scored.
    """
    t0 = time.time()
    torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path_of(out)
    ckpts = load_candidates(member_paths)
    candidate_names = [c["name"] for c in ckpts]
    split = ckpts[0]["split"]
    if any(c["split"] != split for c in ckpts):
        raise ValueError("members were trained on different splits")
    saw_val = [c["name"] for c in ckpts if "val" in c["config"].get("trained_on", [])]
    if select and saw_val:
        raise ValueError(f"--select chooses on the validation split, which {', '.join(saw_val)} trained on "
                         "(--include-val): choose members with held-out runs, then combine the refits without --select")
    pairs = dataset_pairs(data)
    selection = None
    if select:
        candidates = [(load_network(c["state_dict"], dict(c["config"]), "cpu"), dict(c["config"])) for c in ckpts]
        selection = select_members(pairs, split["val"], candidates)
        keep = selection[0]["members"]
        ckpts = [ckpts[i] for i in keep]
    members = [dict(state_dict=c["state_dict"], config=dict(c["config"])) for c in ckpts]
    top = dict(n_classes=3, ensemble="mean of member class probabilities",
               members=[_describe(m["config"]) for m in members], split_seed=ckpts[0]["config"]["split_seed"],
               split_fractions=ckpts[0]["config"]["split_fractions"])
    ckpt = {"members": members, "config": top, "version": MODEL_NAME, "split": split}
    torch.save(ckpt, out)
    seg = HippocampusSegmenter.load(out, device="cpu")

    def run(cases, fn):
        return evaluate_pairs(pairs, fn, cases)

    result = {"val": {}, "test": {}}
    held_out = [("test", split["test"])] if saw_val else [("val", split["val"]), ("test", split["test"])]
    for name, cases in held_out:
        for i, (model, cfg) in enumerate(seg.members):
            r = run(cases, lambda v, m=model, c=cfg: predict_volume(m, v, c))
            result[name][f"member{i}_{_describe(cfg).replace(' ', '_')}"] = {k: v for k, v in r.items()
                                                                             if k != "per_volume"}
        result[name]["ensemble"] = run(cases, lambda v: predict_ensemble(seg.members, v))
        _log(f"[combine] {name}: " + ", ".join(f"{k} {v['mean_dice']:.4f}" for k, v in result[name].items()))
    metrics = {
        "model": MODEL_NAME,
        "weights": out.name,
        "data": "Medical Segmentation Decathlon Task04_Hippocampus (CC-BY-SA 4.0)",
        "config": top,
        "members": [{"file": c["name"], "metrics": c["metrics"]} for c in ckpts],
        "selection": None if selection is None else {
            "method": "every subset of the candidates scored on the validation split (mean foreground Dice)",
            "candidates": candidate_names, "best_subsets": selection},
        "split": split,
        "split_counts": {k: len(v) for k, v in split.items()},
        "trained_on_val": saw_val,
        "val": result["val"] or None,  # None: a member trained on the validation split
        "test": result["test"]["ensemble"],
        "test_members": {k: v for k, v in result["test"].items() if k != "ensemble"},
        "combine_seconds": round(time.time() - t0, 1),
        "dice_definition": "2|P n T|/(|P|+|T|) per volume, 1.0 when both masks are empty; "
                           "mean_dice uses foreground (label > 0)",
    }
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    _log(f"[combine] wrote {out} and {metrics_path}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m models.train_hippocampus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with images/ and labels/")
    ap.add_argument("--out", default="models/hippocampus_unet.pt",
                    help="checkpoint to write; <stem>.metrics.json goes beside it (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                    help="passes over the training split (default %(default)s)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                    help="seed of the split and of training (default %(default)s)")
    ap.add_argument("--max-volumes", type=int, default=None, help="use only the first K cases (sorted)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="wall-time budget in minutes: the LR schedule follows max(step, time) progress "
                    "and training stops when the budget is used (non-deterministic on busy machines)")
    ap.add_argument("--arch", choices=ARCHS, default=DEFAULTS["arch"],
                    help="unet2.5d: 2D slices with neighbours (default); unet3d: whole volumes")
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"default {DEFAULTS['batch_size']} slices, or {DEFAULTS_3D['batch_size']} volumes for unet3d")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default %(default)s)")
    ap.add_argument("--base", type=int, default=DEFAULTS["base"],
                    help="channels of the first UNet level (default %(default)s)")
    ap.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="UNet levels (default %(default)s)")
    ap.add_argument("--axis", type=int, default=DEFAULTS["axis"], choices=[0, 1, 2],
                    help="volume axis the 2.5D slices are cut along (default %(default)s)")
    ap.add_argument("--context", type=int, default=DEFAULTS["context"],
                    help="neighbouring slices on each side given as extra channels (default %(default)s)")
    ap.add_argument("--no-tta", action="store_true", help="disable left-right flip test-time augmentation")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--ema", type=float, default=None, metavar="DECAY",
                    help="validate and save an exponential moving average of the weights (e.g. 0.999)")
    ap.add_argument("--skip-test", action="store_true", help="do not evaluate on the test split after training")
    ap.add_argument("--include-val", action="store_true",
                    help="final refit: train on the training and validation splits together, keep the last epoch")
    ap.add_argument("--combine", nargs="+", metavar="CKPT",
                    help="do not train: merge these trained checkpoints (same split) into --out")
    ap.add_argument("--select", action="store_true",
                    help="with --combine: keep only the subset of members that scores best on the validation split")
    a = ap.parse_args(argv)
    if a.combine:
        return combine(a.data, a.out, a.combine, threads=a.threads, select=a.select)
    return train(a.data, a.out, epochs=a.epochs, seed=a.seed, max_volumes=a.max_volumes, max_steps=a.max_steps,
                 time_limit_min=a.time_limit, batch_size=a.batch_size, lr=a.lr, base=a.base, depth=a.depth,
                 axis=a.axis, context=a.context, tta=not a.no_tta, threads=a.threads, skip_test=a.skip_test,
                 include_val=a.include_val, arch=a.arch, ema=a.ema)


if __name__ == "__main__":
    main()
