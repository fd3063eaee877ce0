"""Tests for the hippocampus segmentation model package (models/)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.data import PadCrop, augment_volumes, context_slices, split_cases, target_size  # noqa: E402
from models.evaluate import dice, jaccard, volume_metrics  # noqa: E402
from models.runtime import make_runner, onnxruntime_available  # noqa: E402
from models.segmenter import DEFAULT_WEIGHTS, HippocampusSegmenter, build_model, predict_volume  # noqa: E402
from models.unet import UNet, UNet2D, UNet3D, fold_batch_norm  # noqa: E402

DATA_DIR = Path(os.environ.get("HIPPOCAMPUS_DATA")
                or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus")
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "images").is_dir() or not (DATA_DIR / "labels").is_dir(),
    reason=f"hippocampus data not found at {DATA_DIR} (set HIPPOCAMPUS_DATA to the folder with images/ and labels/)",
)
needs_weights = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(),
                                   reason=f"shipped weights {DEFAULT_WEIGHTS.name} not present")

# onnxruntime is a runtime requirement: missing, its tests skip locally and fail on CI
needs_onnxruntime = pytest.mark.skipif(not onnxruntime_available() and not os.environ.get("CI"),
                                       reason="onnxruntime/onnx not installed (pip install -r requirements.txt)")
BACKEND_PARAMS = [pytest.param("onnxruntime", marks=needs_onnxruntime), "torch"]

TINY_CONFIG = dict(n_classes=3, base=4, depth=3, dropout=0.0, axis=0, context=1, size=32, tta=True)
TINY_3D_CONFIG = dict(arch="unet3d", n_classes=3, base=4, depth=3, shape=[16, 24, 16], tta=True)


# ---------------------------------------------------------------- unit tests
def test_unet_output_shape():
    torch.manual_seed(0)
    net = UNet2D(in_channels=5, n_classes=3, base=8, depth=4).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 5, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    with torch.inference_mode():
        assert net(torch.randn(1, 5, 48, 40)).shape == (1, 3, 48, 40)


def test_unet3d_output_shape():
    torch.manual_seed(0)
    net = UNet3D(base=4, depth=4).eval()
    assert net.size_multiple == 8
    with torch.inference_mode():
        assert net(torch.randn(2, 1, 16, 24, 8)).shape == (2, 3, 16, 24, 8)
    with pytest.raises(ValueError, match="dims"):
        UNet(dims=4)


def _two_part_label(shape=(24, 32, 24)) -> np.ndarray:
    """A box whose anterior half (high axis-1 index) is label 1 and posterior half label 2, left of centre."""
    label = np.zeros(shape, np.int64)
    label[4:10, 8:16, 8:16] = 2
    label[4:10, 16:24, 8:16] = 1
    return label


def test_augment_volumes_never_swaps_anterior_and_posterior():
    label = torch.from_numpy(np.stack([_two_part_label()] * 16))
    image = label[:, None].float()
    gen = torch.Generator().manual_seed(0)
    x, y = augment_volumes(image, label, crop=(20, 28, 20), generator=gen)
    assert x.shape == (16, 1, 20, 28, 20) and y.shape == (16, 20, 28, 20)
    mirrored = 0
    for lab in y.numpy():
        ant, post = np.argwhere(lab == 1), np.argwhere(lab == 2)
        assert len(ant) and len(post)
        assert ant[:, 1].mean() > post[:, 1].mean() + 3  # anterior stays anterior (axis 1)
        mirrored += ant[:, 0].mean() > lab.shape[0] / 2  # the box started left of centre on axis 0
    assert 0 < mirrored < 16, "left-right mirroring should apply to some samples, not all"


def test_dice_and_jaccard_values():
    pred = np.array([1, 1, 1, 0, 0, 0], bool)
    truth = np.array([1, 0, 0, 1, 0, 0], bool)
    # |P|=3, |T|=2, |P n T|=1, |P u T|=4
    assert dice(pred, truth) == pytest.approx(2 * 1 / 5)
    assert jaccard(pred, truth) == pytest.approx(1 / 4)
    # identical masks; disjoint masks; both empty (defined as 1.0); one empty
    assert dice(truth, truth) == 1.0 and jaccard(truth, truth) == 1.0
    assert dice(pred, ~pred) == 0.0 and jaccard(pred, ~pred) == 0.0
    empty = np.zeros(6, bool)
    assert dice(empty, empty) == 1.0 and jaccard(empty, empty) == 1.0
    assert dice(empty, truth) == 0.0 and jaccard(truth, empty) == 0.0
    # Dice and Jaccard are linked: J = D / (2 - D)
    d = dice(pred, truth)
    assert jaccard(pred, truth) == pytest.approx(d / (2 - d))


def test_volume_metrics_foreground_vs_classes():
    label = np.zeros((4, 4, 4), np.uint8)
    label[1, :2] = 1
    label[1, 2:] = 2
    swapped = np.where(label == 1, 2, np.where(label == 2, 1, 0)).astype(np.uint8)
    m = volume_metrics(swapped, label)
    assert m["dice"] == 1.0 and m["jaccard"] == 1.0  # foreground identical
    assert m["dice_anterior"] == 0.0 and m["dice_posterior"] == 0.0


def test_split_deterministic_and_disjoint():
    cases = [f"hippocampus_{i:03d}" for i in range(1, 236)]
    a = split_cases(cases, seed=0)
    b = split_cases(list(reversed(cases)), seed=0)
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {"train": 165, "val": 35, "test": 35}
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(cases)
    assert split_cases(cases, seed=1)["test"] != a["test"]
    small = split_cases(cases[:6], seed=0)
    assert all(len(v) >= 1 for v in small.values())


def test_padcrop_roundtrip_and_context():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 37, 70)).astype(np.float32)
    pc = PadCrop((37, 70), (64, 64))
    out = pc.apply(arr)
    assert out.shape == (3, 64, 64)
    back = pc.undo(out)
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back[:, :, 3:67], arr[:, :, 3:67])  # the cropped margin is lost
    assert target_size((37, 70), 64, 8) == (64, 72)
    vol = np.arange(4)[:, None, None] * np.ones((4, 2, 3))
    ctx = context_slices(vol, axis=0, context=1)
    assert ctx.shape == (4, 3, 2, 3)
    assert ctx[0, :, 0, 0].tolist() == [0, 0, 1] and ctx[3, :, 0, 0].tolist() == [2, 3, 3]


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_3D_CONFIG], ids=["2.5d", "3d"])
@pytest.mark.parametrize("shape", [(35, 50, 35), (31, 71, 9), (1, 20, 20)])
def test_segment_any_shape(shape, config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    seg = HippocampusSegmenter(model, dict(config), "test", "cpu")
    vol = np.random.default_rng(0).integers(0, 200, size=shape).astype(np.int16)
    out = seg.segment(vol)
    assert out.shape == shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1, 2}


def test_load_single_and_ensemble_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg0 = dict(TINY_CONFIG, split_seed=0)
    cfg2 = dict(TINY_CONFIG, axis=2, tta=False)
    m0, m2, m3 = build_model(cfg0), build_model(cfg2), build_model(TINY_3D_CONFIG)
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    torch.save({"state_dict": m0.state_dict(), "config": cfg0, "version": "hippocampus-unet-test",
                "split": split}, tmp_path / "one.pt")
    torch.save({"members": [{"state_dict": m0.state_dict(), "config": cfg0},
                            {"state_dict": m2.state_dict(), "config": cfg2},
                            {"state_dict": m3.state_dict(), "config": TINY_3D_CONFIG}],
                "config": {"n_classes": 3, "split_seed": 0}, "version": "hippocampus-unet-test",
                "split": split}, tmp_path / "two.pt")
    vol = np.random.default_rng(1).normal(size=(20, 30, 25)).astype(np.float32)
    one = HippocampusSegmenter.load(tmp_path / "one.pt", device="cpu")
    two = HippocampusSegmenter.load(tmp_path / "two.pt", device="cpu")
    assert len(one.members) == 1 and len(two.members) == 3
    assert isinstance(two.members[2][0], UNet3D)
    assert one.version.startswith("hippocampus-unet-test (") and one.version != two.version
    assert one.split == split
    for seg in (one, two):
        out = seg.segment(vol)
        assert out.shape == vol.shape and out.dtype == np.uint8


def _randomise_batch_norm(model: UNet, seed: int = 0) -> UNet:
    """Give every batch norm non-trivial statistics and affine terms, as training would."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1 + 0.1)
    return model.eval()


def test_fold_batch_norm_computes_the_same_function():
    torch.manual_seed(0)
    net = _randomise_batch_norm(UNet2D(in_channels=5, n_classes=3, base=8, depth=3, dropout=0.2))
    folded = fold_batch_norm(net)
    kinds = {type(m) for m in folded.modules()}
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.Dropout2d not in kinds
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "the original is left as it was"
    x = torch.randn(4, 5, 32, 24)
    with torch.inference_mode():
        expected, got = net(x), folded(x)
    assert expected.std() > 0.01  # outputs that vary, so a wrong fold would show
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    net3d = UNet3D(base=4, depth=3).eval()
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in fold_batch_norm(net3d).modules())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_runner_matches_the_network(backend):
    torch.manual_seed(0)
    net = _randomise_batch_norm(UNet2D(in_channels=5, n_classes=3, base=4, depth=3))
    run = make_runner(net, "cpu", backend, threads=1)
    assert run.backend == backend
    x = np.random.default_rng(0).normal(size=(3, 5, 24, 40)).astype(np.float32)  # any batch and plane size
    with torch.inference_mode():
        expected = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(run(x), expected, atol=1e-5)


def test_runner_backend_choice():
    net = UNet2D(in_channels=3, n_classes=3, base=4, depth=2)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        make_runner(net, "cpu", "tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        make_runner(net, "cuda", "onnxruntime")  # refused before any CUDA call
    assert make_runner(UNet3D(base=4, depth=2), "cpu").backend == "torch"  # auto: ONNX Runtime for 2D only
    if onnxruntime_available():
        runner = make_runner(net, "cpu")
        assert runner.backend == "onnxruntime"
        # idle threads sleep: an ensemble's next member (or another request) gets the cores
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def _structured_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth waves plus noise: structure a random network's labels can follow."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    noise = np.random.default_rng(seed).normal(0, 10, shape)
    return (100 + 60 * np.sin(3 * z + 2 * y) * np.cos(4 * x) + noise).astype(np.float32)


def _tiny_ensemble(tmp_path, tta=True) -> Path:
    """A checkpoint of three tiny 2.5D members (axes 0, 2, 0) with trained-looking batch norms."""
    torch.manual_seed(0)
    members = []
    for i, axis in enumerate((0, 2, 0)):
        cfg = dict(TINY_CONFIG, axis=axis, tta=tta)
        net = _randomise_batch_norm(build_model(cfg), seed=i)
        with torch.no_grad():  # an untrained head gives near-uniform classes: sharpen it so labels vary
            net.head.weight.mul_(10)
            net.head.bias.zero_()
        members.append({"state_dict": net.state_dict(), "config": cfg})
    path = tmp_path / "tiny_ensemble.pt"
    torch.save({"members": members, "config": {"n_classes": 3, "split_seed": 0}, "version": "hippocampus-unet-test"},
               path)
    return path


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("flips", [True, False])
def test_fast_path_matches_the_reference_path(tmp_path, backend, flips):
    """Folded networks, batched mirror pass, ONNX Runtime: the same probabilities and labels as plain PyTorch."""
    seg = HippocampusSegmenter.load(_tiny_ensemble(tmp_path), device="cpu", flips=flips, backend=backend, threads=1)
    vol = _structured_volume((21, 30, 17))  # odd sizes: uneven padding
    fast, ref = seg.probabilities(vol), seg.reference_probabilities(vol)
    assert fast.shape == (3, *vol.shape)
    np.testing.assert_allclose(fast, ref, atol=2e-5)
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # voxels whose arg-max cannot flip by float rounding
    assert clear.mean() > 0.99
    labels, ref_labels = seg.segment(vol), seg.segment_reference(vol)
    assert labels.dtype == np.uint8 and len(np.unique(ref_labels)) > 1
    np.testing.assert_array_equal(labels[clear], ref_labels[clear])


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime not installed: members run one after another")
def test_an_ensembles_networks_run_side_by_side_with_one_thread_each_and_the_same_result(tmp_path):
    path = _tiny_ensemble(tmp_path)
    vol = _structured_volume((21, 30, 17), seed=2)
    one_by_one = HippocampusSegmenter.load(path, device="cpu", threads=1)
    side_by_side = HippocampusSegmenter.load(path, device="cpu", threads=2)
    assert (one_by_one.parallel_members, side_by_side.parallel_members) == (1, 2)
    threads = {runner.session.get_session_options().intra_op_num_threads for runner in side_by_side.runners}
    assert threads == {1}, "each network one ONNX Runtime thread; the members share the cores"
    np.testing.assert_array_equal(side_by_side.probabilities(vol), one_by_one.probabilities(vol))
    each = side_by_side.member_probabilities(vol)
    assert [p.shape for p in each] == [(3, *vol.shape)] * len(side_by_side.members)
    np.testing.assert_array_equal(each[1], one_by_one.member_probabilities(vol)[1])  # in member order
    single = HippocampusSegmenter.load(path, device="cpu", members=[0], threads=2)
    assert single.parallel_members == 1 and single.runners[0].session.get_session_options().intra_op_num_threads == 2


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime not installed: members run one after another")
def test_an_ensemble_whose_pool_takes_no_more_work_runs_its_members_on_the_calling_thread(tmp_path):
    """A stopping process's pools refuse new work (issue 35: a request in flight at SIGTERM answered 500)."""
    path = _tiny_ensemble(tmp_path)
    vol = _structured_volume((21, 30, 17), seed=3)
    segmenter = HippocampusSegmenter.load(path, device="cpu", threads=2)
    expected = segmenter.member_probabilities(vol)
    segmenter._member_pool().shutdown()  # as the interpreter's shutdown does to every pool
    refused = segmenter.member_probabilities(vol)
    for got, want in zip(refused, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_members_and_flips_options(tmp_path):
    path = _tiny_ensemble(tmp_path)
    vol = _structured_volume((20, 26, 18), seed=1)
    full = HippocampusSegmenter.load(path, device="cpu")
    assert full.member_indices == (0, 1, 2) and full.flips and len(full.members) == 3
    sha = full.sha256[:12]
    assert full.version == f"hippocampus-unet-test ({sha})"
    one = HippocampusSegmenter.load(path, device="cpu", members=[1], flips=False)
    assert one.member_indices == (1,) and not one.flips and len(one.members) == 1
    assert one.version == f"hippocampus-unet-test ({sha}) members=1 flips=off"
    assert one.members[0][1]["axis"] == 2  # member 1 of the checkpoint, not member 0
    # member 1 alone, without the mirror, is that network's own single pass
    np.testing.assert_array_equal(one.segment(vol),
                                  predict_volume(one.members[0][0], vol, one.members[0][1], tta=False))
    assert HippocampusSegmenter.load(path, device="cpu", members=[2, 0]).version.endswith(" members=2,0")
    assert HippocampusSegmenter.load(path, device="cpu", flips=False).version.endswith(f"({sha}) flips=off")
    flipped = HippocampusSegmenter.load(path, device="cpu", members=[1])
    assert np.abs(flipped.probabilities(vol) - one.probabilities(vol)).max() > 1e-3, "flips must change the result"
    for bad, match in (([3], "index 3 is out of range.*indices 0-2"), ([], "at least one"), ([0, 0], "twice")):
        with pytest.raises(ValueError, match=match):
            HippocampusSegmenter.load(path, device="cpu", members=bad)


def test_tight_canvas_pads_slices_to_a_multiple_of_the_network_not_the_training_size(tmp_path):
    """``canvas="tight"``: each slice padded to the next size multiple (here 4), not to ``size`` (here 32)."""
    path = _tiny_ensemble(tmp_path)
    vol = _structured_volume((21, 30, 17), seed=2)
    seen: dict[str, list] = {"fixed": [], "tight": []}
    probabilities = {}
    for canvas in seen:
        seg = HippocampusSegmenter.load(path, device="cpu", members=[0], flips=False, canvas=canvas, threads=1)
        run = seg.runners[0]
        seg.runners = [lambda x, run=run, shapes=seen[canvas]: (shapes.append(x.shape), run(x))[1]]
        probabilities[canvas] = seg.probabilities(vol)
        assert probabilities[canvas].shape == (3, *vol.shape)
        np.testing.assert_allclose(probabilities[canvas].sum(axis=0), 1.0, atol=1e-5)
    # member 0 slices along axis 0: 21 slices of 30 x 17 with one neighbour each side (3 channels)
    assert seen == {"fixed": [(21, 3, 32, 32)], "tight": [(21, 3, 32, 20)]}
    assert np.abs(probabilities["tight"] - probabilities["fixed"]).max() > 1e-4, "another canvas is another input"
    assert seg.canvas == "tight" and seg.version.endswith(" members=0 flips=off canvas=tight")
    with pytest.raises(ValueError, match="canvas: unknown 'small'; choose one of fixed, tight"):
        HippocampusSegmenter.load(path, device="cpu", canvas="small")


@needs_onnxruntime
def test_exported_graphs_are_cached_by_weights_hash_and_a_damaged_one_is_exported_again(tmp_path, monkeypatch):
    import models.runtime as runtime

    path, cache = _tiny_ensemble(tmp_path), tmp_path / "cache"
    vol = _structured_volume((20, 26, 18), seed=3)
    first = HippocampusSegmenter.load(path, device="cpu", backend="onnxruntime", threads=1, onnx_cache=cache)
    graphs = sorted(cache.glob("*.onnx"))
    assert [g.name.split("-export")[0] for g in graphs] == [f"{first.sha256}-member{i}" for i in range(3)]
    assert sorted(p.name for p in cache.iterdir()) == sorted([g.name for g in graphs] +
                                                              [g.name + ".sha256" for g in graphs])
    expected = first.probabilities(vol)
    exports = []
    real_export = runtime.export_onnx
    monkeypatch.setattr(runtime, "export_onnx", lambda model: exports.append(model) or real_export(model))
    second = HippocampusSegmenter.load(path, device="cpu", backend="onnxruntime", threads=1, onnx_cache=cache)
    assert exports == [], "graphs in the cache must not be exported again"
    np.testing.assert_array_equal(second.probabilities(vol), expected)
    intact = graphs[1].read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0xFF  # inside a weight tensor: the graph would still load, with other weights
    graphs[1].write_bytes(bytes(damaged))
    third = HippocampusSegmenter.load(path, device="cpu", backend="onnxruntime", threads=1, onnx_cache=cache)
    assert len(exports) == 1 and graphs[1].read_bytes() == intact
    np.testing.assert_array_equal(third.probabilities(vol), expected)
    # members=[2] alone finds member 2's graph, not member 0's
    only = HippocampusSegmenter.load(path, device="cpu", members=[2], backend="onnxruntime", threads=1,
                                     onnx_cache=cache)
    assert len(exports) == 1 and only.runners[0].graph == graphs[2].read_bytes()


# ---------------------------------------------------------------- data tests
@needs_data
def test_training_smoke(tmp_path):
    from models.train_hippocampus import train

    out = tmp_path / "smoke.pt"
    metrics = train(DATA_DIR, out, epochs=1, seed=0, max_volumes=6, max_steps=2, base=8, depth=3, threads=2)
    mpath = tmp_path / "smoke.metrics.json"
    assert out.is_file() and mpath.is_file()
    saved = json.loads(mpath.read_text())
    assert saved["split_counts"] == metrics["split_counts"]
    assert sum(saved["split_counts"].values()) == 6
    assert len(saved["history"]) == 1 and "val_dice" in saved["history"][0]
    seg = HippocampusSegmenter.load(out, device="cpu")
    assert seg.version.startswith("hippocampus-unet")
    from models.data import dataset_pairs, load_pair

    image, _ = load_pair(*dataset_pairs(DATA_DIR)[saved["split"]["test"][0]])
    pred = seg.segment(image)
    assert pred.shape == image.shape and pred.dtype == np.uint8


@needs_data
def test_training_ema_saves_the_averaged_weights(tmp_path):
    """--ema validates and saves the moving average: a decay near 0 gives the raw weights, 0.9 does not."""
    from models.train_hippocampus import train

    kwargs = dict(epochs=1, seed=0, max_volumes=6, max_steps=3, base=4, depth=3, threads=2, skip_test=True)
    runs = {}
    for name, decay in (("raw", None), ("tiny", 1e-9), ("ema", 0.9)):
        metrics = train(DATA_DIR, tmp_path / f"{name}.pt", ema=decay, **kwargs)
        assert metrics["training"]["ema_decay"] == decay
        runs[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"]
    floats = [k for k, v in runs["raw"].items() if v.is_floating_point()]
    assert set(runs["raw"]) == set(runs["ema"])
    assert all(torch.allclose(runs["raw"][k], runs["tiny"][k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(runs["raw"][k], runs["ema"][k], atol=1e-6) for k in floats)
    with pytest.raises(ValueError, match="ema decay"):
        train(DATA_DIR, tmp_path / "bad.pt", ema=1.0, **kwargs)


@needs_data
def test_training_smoke_3d(tmp_path):
    from models.train_hippocampus import train

    out = tmp_path / "smoke3d.pt"
    metrics = train(DATA_DIR, out, epochs=1, seed=0, max_volumes=6, max_steps=2, base=4, depth=3, threads=2,
                    arch="unet3d", skip_test=True)
    assert metrics["config"]["arch"] == "unet3d" and metrics["training"]["steps"] == 2
    assert metrics["history"][0]["val_dice"] is not None
    seg = HippocampusSegmenter.load(out, device="cpu")
    assert isinstance(seg.members[0][0], UNet3D)
    vol = np.random.default_rng(0).normal(size=(43, 58, 47)).astype(np.float32)  # the largest training shape
    assert seg.segment(vol).shape == vol.shape


@needs_data
def test_combine_selects_members_on_validation(tmp_path):
    """--combine --select keeps the subset that scores best on the validation split and records the ranking."""
    from models.train_hippocampus import combine, train

    def tiny(name, axis, steps):
        path = tmp_path / f"{name}.pt"
        train(DATA_DIR, path, epochs=1, seed=0, max_volumes=8, max_steps=steps, base=4, depth=3, axis=axis,
              threads=2, skip_test=True)
        return path

    paths = [tiny("a0", 0, 6), tiny("a2", 2, 6), tiny("short", 0, 1)]
    metrics = combine(DATA_DIR, tmp_path / "ens.pt", paths, select=True)
    ranked = metrics["selection"]["best_subsets"]
    assert metrics["selection"]["candidates"] == ["a0.pt", "a2.pt", "short.pt"]
    # 7 subsets of 3 candidates, the best five reported best first; the kept members are the best subset
    assert len(ranked) == 5 and len({tuple(r["members"]) for r in ranked}) == 5
    assert all(a["val_dice"] >= b["val_dice"] for a, b in zip(ranked, ranked[1:], strict=False))
    kept = [paths[i].name for i in ranked[0]["members"]]
    assert [m["file"] for m in metrics["members"]] == kept
    seg = HippocampusSegmenter.load(tmp_path / "ens.pt", device="cpu")
    assert len(seg.members) == len(kept)
    assert metrics["val"]["ensemble"]["mean_dice"] == pytest.approx(ranked[0]["val_dice"], abs=1e-5)
    plain = combine(DATA_DIR, tmp_path / "all.pt", paths)
    assert plain["selection"] is None and len(plain["members"]) == 3
    # a combined checkpoint is a list of candidates of its own, named as its metrics recorded them
    again = combine(DATA_DIR, tmp_path / "again.pt", [tmp_path / "ens.pt", paths[2]], select=True)
    assert again["selection"]["candidates"] == kept + ["short.pt"]


@needs_data
@needs_weights
def test_shipped_weights_dice(capsys):
    from models import evaluate

    result = evaluate.main(["--data", str(DATA_DIR), "--split", "test", "--max-cases", "6"])
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and json.loads(line[0])["n"] == 6
    assert result["mean_dice"] >= 0.85, result
    seg = HippocampusSegmenter.load()
    assert seg.split is not None and not set(seg.split["test"]) & set(seg.split["train"])


@needs_data
def test_include_val_refit_trains_on_validation_and_keeps_the_last_epoch(tmp_path, capsys):
    """--include-val: validation volumes join training, nothing is chosen on them, and --select refuses them."""
    from models.train_hippocampus import combine, train

    kwargs = dict(epochs=2, seed=0, max_volumes=8, base=4, depth=3, threads=2, skip_test=True)
    held_out = train(DATA_DIR, tmp_path / "held.pt", **kwargs)
    refit = train(DATA_DIR, tmp_path / "refit.pt", include_val=True, **kwargs)
    assert held_out["trained_on"] == ["train"] and refit["trained_on"] == ["train", "val"]
    assert held_out["split"] == refit["split"] and refit["split"]["val"], "the split itself does not change"
    assert all(h["val_dice"] is None for h in refit["history"]) and refit["best_val_dice"] is None
    assert refit["best_epoch"] == len(refit["history"]) == 2
    assert json.loads((tmp_path / "refit.metrics.json").read_text())["trained_on"] == ["train", "val"]
    ckpt = torch.load(tmp_path / "refit.pt", weights_only=True)
    assert ckpt["config"]["trained_on"] == ["train", "val"] and ckpt["epoch"] == 2
    with pytest.raises(ValueError, match="refit.pt trained on"):
        combine(DATA_DIR, tmp_path / "ens.pt", [tmp_path / "held.pt", tmp_path / "refit.pt"], select=True)
    merged = combine(DATA_DIR, tmp_path / "ens.pt", [tmp_path / "held.pt", tmp_path / "refit.pt"])
    assert merged["val"] is None and merged["trained_on_val"] == ["refit.pt"]
    assert merged["test"]["n"] == len(refit["split"]["test"])
    from models import evaluate

    capsys.readouterr()
    evaluate.main(["--data", str(DATA_DIR), "--weights", str(tmp_path / "ens.pt"), "--split", "val"])
    assert "trained on the val split; these figures are not held out" in capsys.readouterr().err
    evaluate.main(["--data", str(DATA_DIR), "--weights", str(tmp_path / "ens.pt"), "--split", "test"])
    assert "not held out" not in capsys.readouterr().err


@needs_data
@needs_weights
def test_shipped_fast_path_labels_identical_to_reference():
    """On real test volumes the optimised path (ONNX Runtime, folded, batched) gives the reference labels exactly."""
    from models.data import dataset_pairs, load_pair

    seg = HippocampusSegmenter.load(device="cpu")
    pairs = dataset_pairs(DATA_DIR)
    for case in seg.split["test"][:2]:
        image, label = load_pair(*pairs[case])
        labels = seg.segment(image)
        assert (labels > 0).sum() > 1000  # a real segmentation, not an empty one
        np.testing.assert_array_equal(labels, seg.segment_reference(image))


@needs_data
@needs_weights
def test_shipped_tight_canvas_stays_close_to_the_reference_on_a_training_volume():
    """The fast version's tight canvas moves boundary voxels only (MODEL_CARD.md: test Dice 0.9065 -> 0.9055).

    On training volumes about 3 % of the foreground voxels change label and each structure's Dice
    against the reference (64 x 64) labels is 0.97-0.99; the bounds below leave room for nothing more.
    """
    from models.data import dataset_pairs, load_pair
    from models.evaluate import dice

    seg = HippocampusSegmenter.load(device="cpu", members=[0], flips=False, canvas="tight")
    image, truth = load_pair(*dataset_pairs(DATA_DIR)[seg.split["train"][0]])
    tight, reference = seg.segment(image), seg.segment_reference(image)
    assert (reference > 0).sum() > 1000
    assert 0 < (tight != reference).sum() < 0.05 * (reference > 0).sum()
    for label in (1, 2):
        assert dice(tight == label, reference == label) >= 0.95
    assert dice(tight > 0, truth > 0) >= dice(reference > 0, truth > 0) - 0.01


@needs_data
@needs_weights
def test_evaluate_members_and_no_flip_options(capsys):
    from models import evaluate

    result = evaluate.main(["--data", str(DATA_DIR), "--split", "test", "--max-cases", "2",
                            "--members", "0", "--no-flip", "--canvas", "tight"])
    assert result["n"] == 2 and result["mean_dice"] > 0.8
    assert result["inference"]["members"] == [0] and result["inference"]["flips"] is False
    assert result["inference"]["canvas"] == "tight"
    assert result["weights_version"].endswith(" members=0 flips=off canvas=tight")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(DATA_DIR), "--members", "7"])
    assert "index 7 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(DATA_DIR), "--members", "zero"])
    assert "comma-separated member indices" in capsys.readouterr().err


def _labelled_folder(folder: Path, n: int = 2) -> tuple[Path, Path]:
    """``n`` generated image/label NIfTI pairs (identity affine) in ``folder``/images and ``folder``/labels."""
    import nibabel as nib

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(n):
        label = _two_part_label((21, 30, 17)).astype(np.uint8)
        image = _structured_volume((21, 30, 17), seed=i) + 80 * label
        nib.save(nib.Nifti1Image(image, np.eye(4)), images / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), labels / f"case_{i}.nii.gz")
    return images, labels


def _tiny_manifest(folder: Path) -> Path:
    """A manifest of the shipped form whose family serves a tiny ensemble as two versions with other settings."""
    import shutil

    import yaml

    from models.registry import DEFAULT_MANIFEST, file_sha256

    weights = _tiny_ensemble(folder)
    shutil.move(weights, folder / "tiny.pt")
    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    family = data["families"]["hippocampus"]
    data["families"] = {"hippocampus": family}  # the other families' files are not next to this manifest
    template = family["versions"]["1.0"]
    sha = file_sha256(folder / "tiny.pt")
    family["versions"] = {
        "all": dict(template, weights="tiny.pt", sha256=sha,
                    inference={"members": "all", "flips": True, "canvas": "fixed"}),
        "one": dict(template, weights="tiny.pt", sha256=sha,
                    inference={"members": [1], "flips": False, "canvas": "tight"}),
    }
    family["default_version"] = "one"
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_evaluate_version_runs_the_settings_the_manifest_declares(tmp_path, capsys):
    """``--version V`` scores V with its manifest settings, the same figures as those settings given by hand."""
    from models import evaluate
    from models.registry import file_sha256

    images, labels = _labelled_folder(tmp_path / "data")
    manifest = _tiny_manifest(tmp_path)
    folder = ["--images", str(images), "--labels", str(labels), "--manifest", str(manifest)]
    one = evaluate.main([*folder, "--version", "one"])
    sha = file_sha256(tmp_path / "tiny.pt")
    assert one["n"] == 2 and one["model"] == {"family": "hippocampus", "version": "one", "weights_sha256": sha}
    assert {k: one["inference"][k] for k in ("members", "flips", "canvas")} == {"members": [1], "flips": False,
                                                                               "canvas": "tight"}
    by_hand = evaluate.main(["--images", str(images), "--labels", str(labels), "--weights", str(tmp_path / "tiny.pt"),
                             "--members", "1", "--no-flip", "--canvas", "tight"])
    assert one["per_volume"] == by_hand["per_volume"] and "model" not in by_hand
    everything = evaluate.main([*folder, "--version", "all"])
    assert everything["inference"]["members"] == [0, 1, 2] and everything["inference"]["flips"] is True
    assert everything["per_volume"] != one["per_volume"]  # the settings reached the segmenter
    # no value, or no --version at all: the family's default version
    assert evaluate.main([*folder, "--version"])["model"]["version"] == "one"
    assert evaluate.main(folder)["per_volume"] == one["per_volume"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main([*folder, "--version", "9.9"])
    assert "unknown model_version '9.9' of hippocampus; available: all, one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([*folder, "--version", "one", "--canvas", "fixed"])
    assert "drop --canvas" in capsys.readouterr().err
    with open(tmp_path / "tiny.pt", "r+b") as handle:  # a damaged weights file is refused, never scored
        handle.seek(500)
        handle.write(b"\x00damaged")
    with pytest.raises(SystemExit):
        evaluate.main([*folder, "--version", "all"])
    assert "SHA-256" in capsys.readouterr().err
