"""The generic handler of a declared family: find the series, run the declaration, answer as every door expects.

The answer is the hippocampus handler's shape, for any structures: a ``numeric_label_mask`` with
its ``label_map``, ``series_ml_json[series]`` with ``total_volume_mm3`` and ``<structure>_volume_mm3``,
the voxel volume, the model's provenance, and a Secondary Capture report; ``dicom_outputs`` adds a
DICOM Segmentation and a TID 1500 report naming the model.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import numpy as np

from handlers.declared.report import measure_structures, render_volume_report, structure_key
from handlers.hippocampus.orientation import ras_affine
from inference.config import Settings
from inference.dicom.instance import DicomInstance
from inference.dicom.results import Algorithm, measurement_report, segmentation
from inference.dicom.series import Volume, describe_series, group_by_series, load_volume, require_instances
from inference.dicom.writing import secondary_capture
from inference.errors import ServiceUnavailable, UnprocessableInput
from inference.logs import TaggedLogger
from inference.pipeline.context import HandlerContext
from models.declared.schema import SeriesRule
from models.registry import ModelUnavailable, ModelVersion, registry_for

log = TaggedLogger(logging.getLogger("inference.declared"))

#: What ``dicom_outputs`` may ask for: a DICOM Segmentation, a TID 1500 measurement report.
DICOM_OUTPUTS = ("seg", "sr")


def load_declared(version: ModelVersion):
    """The segmenter of a declared version (its weights verified by the registry before)."""
    from models.declared.runner import DeclaredSegmenter

    started = time.perf_counter()
    segmenter = DeclaredSegmenter.load(version)
    log.info("loaded %s in %.1fs", version.provenance.short, time.perf_counter() - started)
    return segmenter


def warm_up(settings: Settings, family: str) -> str | None:
    """Load every version of ``family``; fail if the default cannot load, report the others that could not."""
    registry = registry_for(settings.model_manifest)
    failed = registry.load_family(family, load_declared)
    default = registry.family(family).default_version
    if default in failed:
        raise ServiceUnavailable(f"{family} {default} (the default): {failed[default]}")
    return "; ".join(f"{family} {name} unavailable: {why}" for name, why in failed.items()) or None


def find_series(series: dict[str, list[DicomInstance]], rule: SeriesRule, family: str) -> list[DicomInstance]:
    """The one series the rule fits (modality, SeriesDescription pattern; with neither, the only series); a 422
    listing the series when none or several fit."""
    fits = []
    for items in series.values():
        dataset = items[0].dataset
        if rule.modality is not None and str(dataset.get("Modality", "")) != rule.modality:
            continue
        if rule.series_description is not None and not re.search(
                rule.series_description, str(dataset.get("SeriesDescription", "")), re.IGNORECASE):
            continue
        fits.append(items)
    wanted = " and ".join(part for part in (
        rule.modality and f"modality {rule.modality}",
        rule.series_description and f"a SeriesDescription matching {rule.series_description!r}") if part) \
        or "the only series"
    if len(fits) != 1:
        raise UnprocessableInput(f"{family} takes one series ({wanted}); {len(fits) or 'no'} series fit; series "
                                 f"present: {describe_series(series)}")
    return fits[0]


def segment_declared(instances: Sequence[DicomInstance], context: HandlerContext, *, family: str) -> tuple[dict, list]:
    """Run the request's version of ``family`` on its series (or the posted volume) and answer with labels,
    volumes, provenance, a report image and, if asked, a SEG and an SR."""
    settings, version, wanted = context.settings, context.model_version, context.params["dicom_outputs"]
    assert version is not None  # the pipeline resolves a family's version
    if context.volume is not None and wanted:
        raise UnprocessableInput("dicom_outputs need the DICOM series; a posted volume gets the label mask only")
    try:
        segmenter = registry_for(settings.model_manifest).model(version, load_declared)
    except ModelUnavailable as exc:  # a broken declaration or weights: that version cannot serve, the server can
        raise ServiceUnavailable(exc.message) from exc
    volume = context.volume
    if volume is None:
        items = find_series(group_by_series(require_instances(instances)), segmenter.declaration.input, family)
        volume = load_volume(items)
    started = time.perf_counter()
    labels = segment_volume(segmenter, volume)
    seconds = time.perf_counter() - started
    provenance = version.provenance
    measures = measure_structures(labels, volume, version.structures)
    log.info("%s: segmented %s in %.3fs: total %.1f mm3", provenance.short, volume.voxels.shape, seconds,
             measures["total_volume_mm3"])
    label_part = {"label": family, "binary_type": "numeric_label_mask",
                  "label_map": {str(s.label): s.name for s in version.structures},
                  "binary_data_shape": {"timepoints": 1, "depth": int(labels.shape[0]),
                                        "height": int(labels.shape[1]), "width": int(labels.shape[2])},
                  "SeriesInstanceUID": volume.series_uid}
    response = {"protocol_version": "1.0", "parts": [label_part],
                "series_ml_json": {volume.series_uid: {**measures, "model": provenance.short,
                                                       "inference_seconds": round(seconds, 3)}},
                "model": provenance.as_json()}
    if context.volume is not None:
        return response, [labels]
    title = f"{family} volume report"
    image = render_volume_report(volume, labels, version.structures, measures, provenance.short, title)
    report = secondary_capture(image, volume.datasets[0], description=title[:64], algorithm=provenance)
    response["parts"].append({"label": title, "binary_type": "dicom_secondary_capture"})
    buffers: list = [labels, report]
    if wanted:
        algorithm = Algorithm(provenance.family,
                              f"{provenance.version} (weights sha256 {provenance.weights_sha256[:12]})")
        try:
            seg = segmentation(volume.datasets, labels, version.structures, algorithm,
                               description=f"{family} segmentation")
        except ValueError as exc:  # highdicom's checks of the source images (e.g. no FrameOfReferenceUID)
            raise UnprocessableInput(f"no DICOM Segmentation can be made on series {volume.series_uid}: {exc}; "
                                     "request without dicom_outputs for the mask alone") from exc
        if "seg" in wanted:
            response["parts"].append({"label": f"{family} segmentation", "binary_type": "dicom"})
            buffers.append(seg)
        if "sr" in wanted:
            volumes = {s.name: measures[f"{structure_key(s.name)}_volume_mm3"] for s in version.structures}
            sr = measurement_report(volume.datasets, seg, volumes, version.structures, algorithm,
                                    description=f"{family} volume measurements")
            response["parts"].append({"label": f"{family} volume measurements", "binary_type": "dicom"})
            buffers.append(sr)
    return response, buffers


def segment_volume(segmenter, volume: Volume) -> np.ndarray:
    """Labels (slices, rows, columns) of ``volume``: the runner works on (column, row, slice) indices to RAS mm."""
    labels = segmenter.segment(volume.voxels.transpose(2, 1, 0), ras_affine(volume), volume.voxel_volume_mm3)
    return np.ascontiguousarray(labels.transpose(2, 1, 0))
