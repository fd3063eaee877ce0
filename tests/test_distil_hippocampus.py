"""Distilling the hippocampus ensemble into one network (models/distil_hippocampus.py, issue 28)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.data import augment_batch  # noqa: E402
from models.distil_hippocampus import distil, soft_loss  # noqa: E402
from models.segmenter import HippocampusSegmenter  # noqa: E402
from models.train_hippocampus import dice_ce_loss  # noqa: E402
from tests.test_models import _labelled_folder, _tiny_ensemble  # noqa: E402


def test_soft_loss_of_one_hot_targets_is_the_hard_loss():
    """With the labels' one-hot as the teacher, soft CE + soft Dice equal CE + soft Dice of the labels."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 16, 16)
    labels = torch.randint(0, 3, (4, 16, 16))
    fg = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()[:, 1:]
    assert soft_loss(logits, fg).item() == pytest.approx(dice_ce_loss(logits, labels).item(), rel=1e-5)
    # a teacher that disagrees costs more than one that agrees with the network's own probabilities
    own = torch.softmax(logits, 1)[:, 1:]
    assert soft_loss(logits, own) < soft_loss(logits, fg.flip(1))


def test_augmentation_moves_soft_targets_with_the_labels_and_keeps_its_random_draws():
    torch.manual_seed(0)
    y = torch.zeros(16, 32, 32, dtype=torch.long)
    y[:, 8:20, 10:16], y[:, 8:20, 16:24] = 1, 2  # two parts side by side along the in-plane axis
    x = torch.randn(16, 5, 32, 32) + y[:, None].float()
    soft = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float()[:, 1:]
    plain_x, plain_y = augment_batch(x, y, torch.Generator().manual_seed(3), flip_dim=3)
    aug_x, aug_y, aug_soft = augment_batch(x, y, torch.Generator().manual_seed(3), flip_dim=3, soft=soft)
    assert torch.equal(plain_x, aug_x) and torch.equal(plain_y, aug_y)  # the same draws with or without targets
    assert not torch.equal(aug_y, y)  # something moved
    probs = torch.cat([(1 - aug_soft.sum(1, keepdim=True)), aug_soft], 1)
    agree = (probs.argmax(1) == aug_y).float().mean().item()
    assert agree > 0.97, f"soft targets and labels disagree on {1 - agree:.1%} of the pixels after augmentation"


def test_distil_trains_a_student_on_teacher_targets_of_the_training_split_only(tmp_path, monkeypatch):
    images, _ = _labelled_folder(tmp_path / "data", n=10)
    teacher = _tiny_ensemble(tmp_path)
    cache = tmp_path / "cache"
    kwargs = dict(teacher_weights=teacher, base=4, epochs=2, max_steps=6, threads=1, batch_size=8)
    metrics = distil(tmp_path / "data", tmp_path / "student.pt", cache, **kwargs)
    train = metrics["split"]["train"]
    assert metrics["trained_on"] == ["train"] and metrics["distillation"]["soft_targets_on"] == "train split only"
    cached = sorted(p.stem for p in cache.rglob("*.npz"))
    assert cached == sorted(train) and not set(cached) & set(metrics["split"]["val"] + metrics["split"]["test"])
    assert metrics["history"] and metrics["best_epoch"] >= 1 and metrics["test"]["n"] == len(metrics["split"]["test"])
    assert json.loads((tmp_path / "student.metrics.json").read_text())["config"]["distilled_from"].startswith(
        "tiny_ensemble.pt sha256 ")
    student = HippocampusSegmenter.load(tmp_path / "student.pt", device="cpu", flips=False, canvas="tight", threads=1)
    assert student.version.startswith("hippocampus-unet-1.1 (") and len(student.members) == 1
    assert student.members[0][1]["axis"] == 2 and student.members[0][1]["trained_on"] == ["train"]
    labels = student.segment(np.random.default_rng(0).normal(100, 20, (21, 30, 17)))
    assert labels.shape == (21, 30, 17) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    assert len(list(images.iterdir())) == 10

    def no_teacher(self, volume):
        raise AssertionError("the cached soft targets should have been reused")

    monkeypatch.setattr(HippocampusSegmenter, "probabilities", no_teacher)
    again = distil(tmp_path / "data", tmp_path / "again.pt", cache, **kwargs)
    assert again["split"] == metrics["split"]
    with pytest.raises(ValueError, match="soft_weight"):
        distil(tmp_path / "data", tmp_path / "bad.pt", cache, soft_weight=1.5, **kwargs)


def test_students_of_two_axes_combine_into_one_checkpoint_whose_members_are_averaged(tmp_path):
    from models.distil_hippocampus import combine_students, main

    _labelled_folder(tmp_path / "data", n=10)
    teacher = _tiny_ensemble(tmp_path)
    kwargs = dict(teacher_weights=teacher, base=4, epochs=1, max_steps=2, threads=1, batch_size=8, skip_test=True)
    for axis in (0, 2):
        distil(tmp_path / "data", tmp_path / f"axis{axis}.pt", tmp_path / "cache", axis=axis, **kwargs)
    main(["--combine", str(tmp_path / "axis0.pt"), str(tmp_path / "axis2.pt"), "--out", str(tmp_path / "both.pt"),
          "--name", "hippocampus-unet-two-views"])
    both = HippocampusSegmenter.load(tmp_path / "both.pt", device="cpu", flips=False, canvas="tight", threads=1)
    assert both.version.startswith("hippocampus-unet-two-views (")
    assert [cfg["axis"] for _, cfg in both.members] == [0, 2]
    record = json.loads((tmp_path / "both.metrics.json").read_text())
    assert [m["config"]["axis"] for m in record["members"]] == [0, 2] and "test" not in record
    volume = np.random.default_rng(1).normal(100, 20, (21, 30, 17))
    singles = [HippocampusSegmenter.load(tmp_path / f"axis{axis}.pt", device="cpu", flips=False, canvas="tight",
                                         threads=1).probabilities(volume) for axis in (0, 2)]
    np.testing.assert_allclose(both.probabilities(volume), (singles[0] + singles[1]) / 2, atol=1e-5)
    other = distil(tmp_path / "data", tmp_path / "other.pt", tmp_path / "cache", seed=1, **kwargs)
    assert other["split"] != json.loads((tmp_path / "axis0.metrics.json").read_text())["split"]
    with pytest.raises(ValueError, match="different splits"):
        combine_students([tmp_path / "axis0.pt", tmp_path / "other.pt"], tmp_path / "bad.pt", "x")
    scored = combine_students([tmp_path / "axis0.pt", tmp_path / "axis2.pt"], tmp_path / "scored.pt", "x",
                              data=tmp_path / "data")
    assert scored["val"]["n"] == len(scored["split"]["val"]) and scored["test"]["n"] == len(scored["split"]["test"])
