r"""Distil the hippocampus ensemble into one 2.5D UNet (knowledge distillation, issue 28).

Usage (from the repository root):

    python -m models.distil_hippocampus --data ../shared/data/hippocampus --cache /tmp/distil-cache \
        --out models/hippocampus_unet_1_1.pt [--axis 2 --base 16 --time-limit 75 --threads 1]

The teacher is a checkpoint run with given inference settings (default: the ``1.0`` ensemble, all
members with their mirrored passes on the 64 x 64 canvas). Its averaged class probabilities on the
**training split only** are the soft targets; they are computed once and kept in ``--cache`` (a
folder outside the repository, one ``.npz`` per case, named by the teacher's SHA-256 so a changed
teacher is never mixed in). The student is trained on those slices with

    loss = soft_weight * (soft cross-entropy + soft Dice, against the teacher)
           + (1 - soft_weight) * (cross-entropy + soft Dice, against the labels)

and the same augmentation as the members (the soft targets are warped with the image). The epoch
kept is the one with the best validation Dice, scored as the student will be served (one pass,
``--canvas``). The test split is scored once at the end and never used for a choice.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import (
    PadCrop,
    augment_batch,
    context_slices,
    dataset_pairs,
    load_pair,
    normalize,
    split_cases,
)
from .evaluate import evaluate_pairs
from .registry import file_sha256
from .segmenter import CANVASES, DEFAULT_WEIGHTS, HippocampusSegmenter, build_model, predict_volume
from .train_hippocampus import DEFAULTS, dice_ce_loss, dice_fg, lr_at, metrics_path_of

DEFAULT_STUDENT_NAME = "hippocampus-unet-1.1"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def teacher_probabilities(teacher: HippocampusSegmenter, pairs: dict, cases: list[str], cache: Path) -> dict:
    """{case: foreground probabilities (2, *shape) float16} of the teacher, read from or written to ``cache``."""
    folder = cache / f"teacher-{teacher.sha256}{teacher.version.split(')')[-1].replace(' ', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    t0 = time.time()
    for i, c in enumerate(cases):
        path = folder / f"{c}.npz"
        if path.is_file():
            out[c] = np.load(path)["fg"]
            continue
        image, _ = load_pair(*pairs[c])
        fg = teacher.probabilities(image)[1:].astype(np.float16)
        np.savez(path, fg=fg)
        out[c] = fg
        if (i + 1) % 20 == 0:
            _log(f"[distil] teacher {i + 1}/{len(cases)} ({time.time() - t0:.0f}s)")
    return out


def student_samples(pairs: dict, cases: list[str], soft: dict, axis: int, context: int,
                    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2.5D slices (N, 2c+1, size, size), labels (N, size, size) and teacher foreground (N, 2, size, size)."""
    xs, ys, ss = [], [], []
    for c in cases:
        image, label = load_pair(*pairs[c])
        x = context_slices(normalize(image), axis, context)
        pc = PadCrop(x.shape[-2:], (size, size))
        xs.append(pc.apply(x, 0.0))
        ys.append(pc.apply(np.moveaxis(label, axis, 0), 0))
        ss.append(pc.apply(np.moveaxis(soft[c].astype(np.float32), axis + 1, 0), 0.0))
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64),
            np.concatenate(ss).astype(np.float32))


def soft_loss(logits: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy plus soft Dice of the foreground classes against teacher probabilities.

    ``fg`` holds the teacher's foreground probabilities (B, 2, H, W); background is the rest.
    """
    target = torch.cat([(1 - fg.sum(1, keepdim=True)).clamp(min=0), fg], 1)
    logp = torch.log_softmax(logits, 1)
    ce = -(target * logp).sum(1).mean()
    probs = logp.exp()[:, 1:]
    dims = (0, 2, 3)
    soft_dice = (2 * (probs * fg).sum(dims) + 1.0) / (probs.sum(dims) + fg.sum(dims) + 1.0)
    return ce + (1 - soft_dice.mean())


def distil(data: str | Path, out: str | Path, cache: str | Path, teacher_weights: str | Path | None = None,
           axis: int = 2, base: int = 16, epochs: int = 40, time_limit_min: float | None = None,
           soft_weight: float = 0.7, seed: int = 0, threads: int = 1, batch_size: int = DEFAULTS["batch_size"],
           lr: float = DEFAULTS["lr"], weight_decay: float = DEFAULTS["weight_decay"],
           canvas: str = "tight", max_volumes: int | None = None, max_steps: int | None = None,
           skip_test: bool = False, name: str = DEFAULT_STUDENT_NAME) -> dict:
    """Train the student; write the best-validation checkpoint to ``out`` and its metrics JSON; return the metrics."""
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be between 0 and 1, got {soft_weight}")
    if canvas not in CANVASES:
        raise ValueError(f"canvas: choose one of {', '.join(CANVASES)}")
    t_start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out, cache = Path(out), Path(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = dataset_pairs(data)
    if not pairs:
        raise FileNotFoundError(f"no image/label pairs under {data}")
    cases = sorted(pairs)[:max_volumes] if max_volumes else sorted(pairs)
    fractions = (0.7, 0.15, 0.15)
    split = split_cases(cases, seed, fractions)
    teacher_path = Path(teacher_weights) if teacher_weights else DEFAULT_WEIGHTS
    teacher = HippocampusSegmenter.load(teacher_path, device="cpu", threads=threads)
    unseen = set((teacher.split or {}).get("test", []))
    if unseen & set(split["train"]):
        # only with --max-volumes or another seed: the teacher's held-out volumes never become soft targets
        _log(f"[distil] leaving out {len(unseen & set(split['train']))} training volumes of the teacher's test split")
        split["train"] = [c for c in split["train"] if c not in unseen]
    _log(f"[distil] teacher {teacher.version}; soft targets on the {len(split['train'])} training volumes")
    soft = teacher_probabilities(teacher, pairs, split["train"], cache)
    t_teacher = time.time() - t_start
    del teacher

    context, size = DEFAULTS["context"], DEFAULTS["size"]
    config = dict(arch="unet2.5d", n_classes=3, base=base, depth=DEFAULTS["depth"], dropout=DEFAULTS["dropout"],
                  tta=False, axis=axis, context=context, size=size,
                  normalisation="clip 0.5-99.5 percentile, z-score per volume",
                  split_seed=seed, split_fractions=list(fractions), trained_on=["train"],
                  distilled_from=f"{teacher_path.name} sha256 {file_sha256(teacher_path)}")
    x_np, y_np, s_np = student_samples(pairs, split["train"], soft, axis, context, size)
    x_all, y_all, s_all = torch.from_numpy(x_np), torch.from_numpy(y_np), torch.from_numpy(s_np)
    val_data = [load_pair(*pairs[c]) for c in split["val"]]
    _log(f"[distil] {len(x_all)} training slices of {tuple(x_all.shape[1:])}, ready after {time.time() - t_start:.0f}s")
    served = dict(config, size=0) if canvas == "tight" else config  # size 0: pad to the next multiple of 8

    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    flip_dim = 1 if axis == 0 else 2
    history: list[dict] = []
    best: dict = {"val_dice": -1.0, "epoch": 0, "state": None}
    step, stop, train_t0 = 0, False, time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        losses, t_ep = [], time.time()
        for i in range(steps_per_epoch):
            progress = step / total_steps
            if time_limit_min is not None:
                progress = max(progress, (time.time() - train_t0) / (time_limit_min * 60))
            if progress >= 1.0:
                stop = True
                break
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb, sb = augment_batch(x_all[idx], y_all[idx], generator=gen, flip_dim=flip_dim, soft=s_all[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, progress, lr, warmup=min(100, total_steps // 10))
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = soft_weight * soft_loss(logits, sb) + (1 - soft_weight) * dice_ce_loss(logits, yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        if not losses:
            break
        model.eval()
        with torch.inference_mode():
            vd = [dice_fg(predict_volume(model, im, served, tta=False), lab) for im, lab in val_data]
        val_dice = float(np.mean(vd)) if vd else None
        history.append({"epoch": epoch, "steps": step, "train_loss": round(float(np.mean(losses)), 5),
                        "val_dice": None if val_dice is None else round(val_dice, 5),
                        "epoch_seconds": round(time.time() - t_ep, 1)})
        improved = val_dice is None or best["state"] is None or val_dice > best["val_dice"]
        if improved:
            best = {"val_dice": val_dice, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            torch.save({"state_dict": best["state"], "config": config, "version": name, "split": split,
                        "epoch": epoch, "val_dice": val_dice}, out)
        _log(f"[distil] epoch {epoch}: loss {np.mean(losses):.4f} val_dice {val_dice} "
             f"{'(best, saved) ' if improved else ''}[{time.time() - t_ep:.0f}s, "
             f"{(time.time() - train_t0) / 60:.1f} min]")
        if stop:
            break
    train_seconds = time.time() - train_t0
    model.load_state_dict(best["state"])
    model.eval()
    test = None
    if not skip_test and split["test"]:
        with torch.inference_mode():
            test = evaluate_pairs(pairs, lambda v: predict_volume(model, v, served, tta=False), split["test"])
        _log(f"[distil] test (epoch {best['epoch']}, canvas {canvas}): mean_dice {test['mean_dice']:.4f} "
             f"anterior {test['dice_anterior']:.4f} posterior {test['dice_posterior']:.4f}")
    metrics = {
        "model": name, "weights": out.name,
        "data": "Medical Segmentation Decathlon Task04_Hippocampus (CC-BY-SA 4.0)",
        "config": config,
        "distillation": {"teacher": config["distilled_from"], "teacher_inference": "all members, mirrored passes, "
                         "64 x 64 canvas (version 1.0)", "soft_targets_on": "train split only",
                         "soft_weight": soft_weight,
                         "loss": "soft_weight * (soft CE + soft Dice vs teacher) + (1 - soft_weight) * "
                                 "(CE + soft Dice vs labels)",
                         "teacher_seconds": round(t_teacher, 1)},
        "training": {"epochs_requested": epochs, "epochs_run": len(history), "steps": step,
                     "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "optimizer": "AdamW, linear warm-up then cosine decay", "time_limit_min": time_limit_min,
                     "max_volumes": max_volumes, "max_steps": max_steps, "threads": threads,
                     "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
                     "torch": torch.__version__, "python": platform.python_version()},
        "validation_canvas": canvas,
        "split": split, "split_counts": {k: len(v) for k, v in split.items()}, "trained_on": ["train"],
        "best_epoch": best["epoch"],
        "best_val_dice": None if best["val_dice"] is None else round(best["val_dice"], 5),
        "history": history, "test": test,
        "dice_definition": "2|P n T|/(|P|+|T|) per volume, 1.0 when both masks are empty; "
                           "mean_dice uses foreground (label > 0)",
    }
    metrics_path = metrics_path_of(out)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    _log(f"[distil] wrote {out} and {metrics_path}")
    return metrics


def combine_students(paths: list[str | Path], out: str | Path, name: str, data: str | Path | None = None,
                     canvas: str = "tight") -> dict:
    """One checkpoint whose ``members`` are the students in ``paths`` (e.g. one per slicing axis): the
    segmenter averages their class probabilities, as it does the ``1.0`` ensemble's. Splits must agree.

    Writes ``<stem>.metrics.json`` beside ``out`` (each student's own metrics file when present) and,
    with ``data``, the combination's figures on the validation and test splits (one pass, ``canvas``);
    returns those metrics. Choose the combination on validation: the test split is only reported.
    """
    checkpoints = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    splits = {json.dumps(c.get("split"), sort_keys=True) for c in checkpoints}
    if len(splits) != 1:
        raise ValueError("the students were trained on different splits; combine students of one split only")
    members = [{"state_dict": c["state_dict"], "config": c["config"]} for c in checkpoints]
    config = {"n_classes": 3, "ensemble": "mean of member class probabilities",
              "members": [f"unet2.5d axis {m['config']['axis']} width {m['config']['base']}" for m in members],
              "split_seed": checkpoints[0]["config"]["split_seed"],
              "split_fractions": checkpoints[0]["config"]["split_fractions"], "trained_on": ["train"],
              "distilled_from": checkpoints[0]["config"].get("distilled_from")}
    out = Path(out)
    split = checkpoints[0].get("split")
    torch.save({"members": members, "config": config, "version": name, "split": split}, out)
    students = []
    for path in map(Path, paths):
        sidecar = metrics_path_of(path)
        students.append(json.loads(sidecar.read_text()) if sidecar.is_file() else {"weights": path.name})
    metrics: dict = {"model": name, "weights": out.name, "config": config, "members": students, "split": split,
                     "trained_on": ["train"], "validation_canvas": canvas}
    if data is not None and split:
        pairs = dataset_pairs(data)
        combined = HippocampusSegmenter.load(out, device="cpu", flips=False, canvas=canvas)
        for part in ("val", "test"):
            metrics[part] = evaluate_pairs(pairs, combined.segment, split[part])
            _log(f"[distil] combined, {part}: mean_dice {metrics[part]['mean_dice']:.4f} "
                 f"anterior {metrics[part]['dice_anterior']:.4f} posterior {metrics[part]['dice_posterior']:.4f}")
    metrics_path = metrics_path_of(out)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m models.distil_hippocampus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--combine", nargs="+", metavar="STUDENT",
                    help="instead of training: write --out as one checkpoint whose members are these students")
    ap.add_argument("--data", help="folder with images/ and labels/ (with --combine: scores the combination)")
    ap.add_argument("--out", required=True, help="student checkpoint; <stem>.metrics.json goes beside it")
    ap.add_argument("--cache",
                    help="folder for the teacher's soft targets (outside the repository; reused between runs)")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default models/hippocampus_unet.pt)")
    ap.add_argument("--axis", type=int, default=2, choices=[0, 1, 2], help="slicing axis (default %(default)s)")
    ap.add_argument("--base", type=int, default=16, help="channels of the first level (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=40, help="at most this many epochs (default %(default)s)")
    ap.add_argument("--time-limit", type=float, default=None, help="training wall-time budget in minutes")
    ap.add_argument("--soft-weight", type=float, default=0.7,
                    help="weight of the teacher's loss against the labels' (default %(default)s)")
    ap.add_argument("--canvas", choices=CANVASES, default="tight",
                    help="canvas the student is validated and served with (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="split and training seed (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--max-volumes", type=int, default=None, help="use only the first K cases (sorted)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps")
    ap.add_argument("--skip-test", action="store_true", help="do not score the test split at the end")
    ap.add_argument("--name", default=DEFAULT_STUDENT_NAME,
                    help="model name stored in the checkpoint and metrics (default %(default)s)")
    a = ap.parse_args(argv)
    if a.combine:
        return combine_students(a.combine, a.out, a.name, a.data, a.canvas)
    if not a.data or not a.cache:
        ap.error("--data and --cache are needed to train a student")
    return distil(a.data, a.out, a.cache, a.teacher, axis=a.axis, base=a.base, epochs=a.epochs,
                  time_limit_min=a.time_limit, soft_weight=a.soft_weight, seed=a.seed, threads=a.threads,
                  canvas=a.canvas, max_volumes=a.max_volumes, max_steps=a.max_steps, skip_test=a.skip_test,
                  name=a.name)


if __name__ == "__main__":
    main()
