"""Hippocampal volume: segment anterior and posterior hippocampus in a study's crop series.

Over HTTP (``inference_command`` ``get-hippocampus-volume``, or ``POST /hippocampus``) the
handler finds the crop series (SeriesDescription matching the model version's rule, or
``INFERENCE_HIPPOCAMPUS_SERIES``), segments it with the version of the ``hippocampus`` family the
request names (``model_version``; the manifest's default otherwise, see ``models/registry.py``) and
answers a ``numeric_label_mask``, the volumes in ``series_ml_json``, the model's provenance, a
``quality`` flag with its reasons, the ``change_since_prior`` (``assessment.py``) and a Secondary
Capture report showing both. The batch command line (``python -m handlers.hippocampus``) is
``cli.py``.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from handlers.hippocampus.assessment import change_since_prior, crop_properties, quality_of
from handlers.hippocampus.orientation import from_model_orientation, to_model_orientation
from handlers.hippocampus.report import dicom_results, measure_volumes, render_report, structure_volumes
from inference.config import Settings
from inference.dicom.instance import DicomInstance
from inference.dicom.series import Volume, describe_series, group_by_series, load_volume, require_instances
from inference.dicom.writing import secondary_capture
from inference.errors import ServiceUnavailable, UnprocessableInput
from inference.logs import TaggedLogger
from inference.pipeline.context import HandlerContext
from inference.pipeline.handler_registry import Param, register
from models.registry import ModelUnavailable, ModelVersion, registry_for

log = TaggedLogger(logging.getLogger("inference.hippocampus"))

COMMAND = "get-hippocampus-volume"
FAMILY = "hippocampus"
#: What ``dicom_outputs`` may ask for: a DICOM Segmentation, a TID 1500 measurement report.
DICOM_OUTPUTS = ("seg", "sr")


def load_version(version: ModelVersion, onnx_cache: Path | None = None):
    """The segmenter of a registry version: its weights with its inference settings (CUDA when available).

    ``onnx_cache`` (``INFERENCE_MODEL_CACHE``) keeps the exported ONNX graphs between loads.
    """
    from models.segmenter import HippocampusSegmenter, version_settings

    started = time.perf_counter()
    segmenter = HippocampusSegmenter.load(version.weights, onnx_cache=onnx_cache,
                                          **version_settings(version.inference))
    log.info("loaded %s in %.1fs", version.provenance.short, time.perf_counter() - started)
    return segmenter


def segmenter_for(settings: Settings, version: ModelVersion):
    """The loaded model of a registry version (loaded once per process, then shared)."""
    registry = registry_for(settings.model_manifest)
    try:
        return registry.model(version, partial(load_version, onnx_cache=settings.model_cache))
    except ModelUnavailable as exc:
        raise ServiceUnavailable(exc.message) from exc


def warm_up(settings: Settings) -> str | None:
    """Load every version of the family; fail if the default cannot load, report the others that could not."""
    registry = registry_for(settings.model_manifest)
    failed = registry.load_family(FAMILY, partial(load_version, onnx_cache=settings.model_cache))
    default = registry.family(FAMILY).default_version
    if default in failed:
        raise ServiceUnavailable(f"{FAMILY} {default} (the default): {failed[default]}")
    return "; ".join(f"{FAMILY} {name} unavailable: {why}" for name, why in failed.items()) or None


def find_crop_series(series: dict[str, list[DicomInstance]], pattern: str) -> list[DicomInstance]:
    """The series whose SeriesDescription matches ``pattern``; a 422 listing the series otherwise."""
    matcher = re.compile(pattern, re.IGNORECASE)
    matches = [items for items in series.values()
               if matcher.search(str(items[0].dataset.get("SeriesDescription", "")))]
    if not matches:
        raise UnprocessableInput(f"no series has a SeriesDescription matching {pattern!r} (the hippocampus crop); "
                                 f"series present: {describe_series(series)}")
    if len(matches) > 1:
        log.warning("%d series match %r; using the first", len(matches), pattern)
    return matches[0]


def series_shape(series: Sequence[DicomInstance]) -> tuple[int, int, int]:
    """(frames, rows, columns) of a series, from its headers."""
    first = series[0].dataset
    frames = sum(int(item.dataset.get("NumberOfFrames", 1) or 1) for item in series)
    return frames, int(first.Rows), int(first.Columns)


def check_model_memory(shape: Sequence[int], series_uid: str, settings: Settings, version: ModelVersion,
                       segmenter) -> None:
    """422 naming INFERENCE_MODEL_MEMORY_BYTES and the series when the model's run on a series of ``shape`` could
    take more memory than that: its largest count over the orders the series may take in model orientation."""
    need = max(segmenter.peak_bytes(order) for order in itertools.permutations(shape))
    if need > settings.model_memory_bytes:
        raise UnprocessableInput(
            f"series {series_uid} ({' x '.join(str(n) for n in shape)} voxels) needs up to {need / 2**30:.1f} GiB for "
            f"{version.family} {version.version}, over the model memory limit INFERENCE_MODEL_MEMORY_BYTES="
            f"{settings.model_memory_bytes} ({settings.model_memory_bytes / 2**30:.1f} GiB); send the hippocampus "
            "crop (a few dozen voxels a side), not a whole series")


def segment_study(instances: Sequence[DicomInstance], settings: Settings, version: ModelVersion,
                  segmenter, volume: Volume | None = None) -> tuple[Volume, np.ndarray, dict, float, dict]:
    """Find and segment the crop series (or the posted crop ``volume``): its volume, labels (slices,
    rows, columns), measures, seconds, and its quality block (``assessment.quality_of``)."""
    if volume is None:
        pattern = settings.hippocampus_series or version.input["series_description"]
        crop = find_crop_series(group_by_series(require_instances(instances)), pattern)
        check_model_memory(series_shape(crop), str(crop[0].dataset.get("SeriesInstanceUID", "")), settings, version,
                           segmenter)  # before its pixels are read
        volume = load_volume(crop)
    else:
        check_model_memory(volume.voxels.shape, volume.series_uid, settings, version, segmenter)
    from models.segmenter import mean_probabilities  # torch is imported with the model, not with the handlers

    started = time.perf_counter()
    voxels, orientation = to_model_orientation(volume)
    members = segmenter.member_probabilities(voxels)
    labels = from_model_orientation(np.argmax(mean_probabilities(members), axis=0).astype(np.uint8), orientation)
    seconds = time.perf_counter() - started
    measures = measure_volumes(labels, volume)
    quality = quality_of(version, *crop_properties(volume, voxels, orientation), members, volume.voxel_volume_mm3,
                         measures["total_volume_mm3"])
    return volume, labels, measures, seconds, quality


@register(COMMAND, route="/hippocampus", warm_up=warm_up, family=FAMILY, volume_input=True,
          description="Anterior/posterior hippocampus segmentation and volumes (HippoCrop series)",
          params=[Param("dicom_outputs", "string-list", default=[], choices=DICOM_OUTPUTS,
                        description="DICOM results to add: 'seg' (a DICOM Segmentation), 'sr' (a TID 1500 "
                                    "volume report)")])
def hippocampus_volume(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """Segment the hippocampus crop series: label mask, volumes and a Secondary Capture report.

    ``"dicom_outputs": ["seg", "sr"]`` adds a DICOM Segmentation and a measurement report. A posted
    crop volume (``context.volume``, the Radiomics door) gets the label mask and the volumes only: the
    report and the DICOM results need the series' DICOM headers.
    """
    settings, wanted, version = context.settings, context.params["dicom_outputs"], context.model_version
    if context.volume is not None and wanted:
        raise UnprocessableInput("dicom_outputs need the DICOM series; a posted volume gets the label mask only")
    segmenter = segmenter_for(settings, version)
    provenance = version.provenance
    volume, labels, measures, seconds, quality = segment_study(instances, settings, version, segmenter,
                                                               context.volume)
    model_version = provenance.short
    log.info("segmented %s in %.3fs: total %.1f mm3%s", volume.voxels.shape, seconds, measures["total_volume_mm3"],
             "; flagged: " + "; ".join(quality["reasons"]) if quality["flagged"] else "")
    series_uid = volume.series_uid
    label_part = {"label": "Hippocampus", "binary_type": "numeric_label_mask",
                  "label_map": {str(s.label): s.name for s in version.structures},
                  "binary_data_shape": {"timepoints": 1, "depth": int(labels.shape[0]),
                                        "height": int(labels.shape[1]), "width": int(labels.shape[2])},
                  "SeriesInstanceUID": series_uid}
    series_ml_json = {series_uid: {**measures, "model": model_version, "inference_seconds": round(seconds, 3)}}
    if context.volume is not None:
        return {"protocol_version": "1.0", "parts": [label_part], "series_ml_json": series_ml_json,
                "model": provenance.as_json(), "quality": quality}, [labels]
    volumes = structure_volumes(measures, version.structures)
    change = change_since_prior(settings, volume, version, volumes, quality)
    reference = volume.datasets[0]
    image = render_report(volume, labels, measures, model_version, version.structures, quality, change)
    report = secondary_capture(image, reference, description="Hippocampal volume report", algorithm=provenance)
    response = {
        "protocol_version": "1.0",
        "parts": [label_part, {"label": "Hippocampal volume report", "binary_type": "dicom_secondary_capture"}],
        "series_ml_json": series_ml_json,
        "model": provenance.as_json(),
        "quality": quality,
        "change_since_prior": change,
    }
    buffers = [labels, report]
    if wanted:
        for part, dataset in dicom_results(volume, labels, version.structures, provenance, wanted, quality, change):
            response["parts"].append(part)
            buffers.append(dataset)
    return response, buffers
