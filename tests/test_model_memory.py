"""A model run's memory is bounded by design: the network takes a fixed number of pixels per batch whatever the
slice size, the segmenter counts what a run allocates (``peak_bytes``), and a series whose run would need more than
INFERENCE_MODEL_MEMORY_BYTES is a 422 naming the limit and the series before its pixels are read (issue 35: a
512 x 512 x 22 series matching the crop pattern took a worker to 22.9 GB)."""

from __future__ import annotations

import dataclasses
import io
import tracemalloc
from functools import partial

import numpy as np
import pytest

import handlers.hippocampus.handler as hippocampus
from handlers.hippocampus.handler import COMMAND, load_version
from inference.config import Settings, get_settings
from inference.dicom.writing import dataset_bytes, series_from_volume
from inference.errors import UnprocessableInput
from inference.pipeline.pipeline import Pipeline
from models.registry import registry_for
from models.segmenter import ACTIVATION_BYTES_PER_PIXEL_PER_BASE, BATCH_PIXELS, build_model, fast_member_probs
from tests.conftest import PROJECT_ROOT

WEIGHTS = PROJECT_ROOT / "models" / "hippocampus_unet.pt"
needs_weights = pytest.mark.skipif(not WEIGHTS.exists(), reason="the model weights are not in models/")


def test_a_large_slice_goes_through_the_network_in_smaller_batches():
    """128 slices of 512 x 64 at once was 128 times the training batch's pixels / 8: the batch shrinks instead."""
    model = build_model({"base": 4, "depth": 2, "context": 1, "n_classes": 3})
    seen = []

    def runner(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return np.full((x.shape[0], 3, *x.shape[2:]), 1 / 3, np.float32)

    config = {"axis": 2, "context": 1, "size": 64, "n_classes": 3}
    probabilities = fast_member_probs(runner, model, np.zeros((512, 64, 40), np.float32), config, flip=True)
    assert probabilities.shape == (3, 512, 64, 40)
    assert sum(shape[0] for shape in seen) == 2 * 40, "every slice of both passes, once"
    assert max(shape[0] * shape[2] * shape[3] for shape in seen) <= BATCH_PIXELS
    small = []
    fast_member_probs(lambda x: small.append(x.shape) or runner(x), model, np.zeros((40, 56, 40), np.float32),
                      config, flip=True)
    assert small[0][0] == 80, "a crop's slices still go in one batch"


def crop_parts(shape: tuple[int, int, int]) -> list[io.BytesIO]:
    voxels = np.random.default_rng(1).integers(0, 1000, shape).astype(np.int16)
    return [io.BytesIO(dataset_bytes(ds)) for ds in series_from_volume(voxels, description="HippoCrop")]


@needs_weights
def test_a_series_over_the_memory_limit_is_a_422_naming_it_and_the_series_before_its_pixels_are_read(monkeypatch):
    def no_pixels(*args, **kwargs):
        raise AssertionError("the series' pixels were read before the memory check")

    monkeypatch.setattr(hippocampus, "load_volume", no_pixels)
    settings = dataclasses.replace(Settings(), model_memory_bytes=1024**3)  # 1 GiB
    parts = crop_parts((22, 128, 128))
    with pytest.raises(UnprocessableInput) as refused:
        Pipeline(settings, commands=[COMMAND]).run({}, parts, "0" * 64, command=COMMAND)
    message = refused.value.message
    assert "INFERENCE_MODEL_MEMORY_BYTES=1073741824 (1.0 GiB)" in message and "22 x 128 x 128 voxels" in message
    assert "hippocampus 1.0" in message and "series 1." in message, message


@needs_weights
def test_the_issues_series_is_refused_with_the_default_version_and_limit(monkeypatch):
    """512 x 512 x 22 with the default version and limit: a 422, not a worker killed by the kernel."""
    settings = Settings()
    assert settings.model_memory_bytes == 4 * 1024**3
    monkeypatch.setattr(hippocampus, "load_volume", lambda *a, **k: pytest.fail("pixels read before the check"))
    with pytest.raises(UnprocessableInput, match="INFERENCE_MODEL_MEMORY_BYTES"):
        Pipeline(settings, commands=[COMMAND]).run({}, crop_parts((22, 512, 512)), "0" * 64, command=COMMAND)


@needs_weights
@pytest.mark.parametrize("name", ["1.0", "1.0-fast", "1.1", "1.2"])
def test_peak_bytes_bounds_the_arrays_a_run_allocates(name):
    """What numpy allocates during ``member_probabilities`` (traced) stays under the segmenter's own count
    without the networks' activations (ONNX Runtime's, which tracemalloc cannot see: bench.model_memory)."""
    settings = get_settings()
    registry = registry_for(settings.model_manifest)
    segmenter = registry.model(registry.family("hippocampus").resolve(name),
                               partial(load_version, onnx_cache=settings.model_cache))
    activations = sum(ACTIVATION_BYTES_PER_PIXEL_PER_BASE * int(cfg["base"]) * BATCH_PIXELS
                      for _, cfg in segmenter.members)
    for shape in ((40, 56, 40), (96, 96, 22)):
        volume = np.random.default_rng(0).normal(300, 60, shape).astype(np.float32)
        segmenter.member_probabilities(volume)  # sessions and pool made
        tracemalloc.start()
        try:
            segmenter.member_probabilities(volume)
            _, traced = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        counted = segmenter.peak_bytes(shape) - activations - 4 * volume.size  # the volume is the caller's
        assert traced <= counted, f"{name} {shape}: traced {traced / 2**20:.1f} MiB > counted {counted / 2**20:.1f}"
