"""What a hippocampus result says besides its volumes: its quality flag and its change since the patient's prior.

The flag (``models.quality``) checks the crop against the version's ``validated_input`` and the members'
disagreement against its calibrated ``uncertainty`` threshold; every result is also counted on
``/metrics`` for the drift watch. The change compares with the most recent earlier result of the same
patient by the same family and version (``history``: our own store, then the PACS when configured).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from handlers.hippocampus.history import compare, empty_change, result_history
from handlers.hippocampus.orientation import ras_affine
from inference import metrics
from inference.config import Settings
from inference.dicom.series import Volume
from inference.pacs.priors import Patient, PriorResult, find_in_pacs
from models.monitoring import watched_values
from models.quality import assess, in_series_order, input_properties, structure_uncertainty
from models.registry import ModelVersion


def crop_properties(volume: Volume, voxels: np.ndarray, orientation: np.ndarray) -> tuple[dict, list[int]]:
    """The crop's checked properties measured in the model's orientation (``voxels`` and ``orientation`` as
    ``to_model_orientation`` returned them), and the RAS axis of each of the series' (slice, row, column) axes."""
    zooms = (volume.spacing[2], volume.spacing[1], volume.spacing[0])  # (column, row, slice) index order
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(orientation):
        spacing[int(target)] = float(zooms[axis])
    modality = str(volume.datasets[0].get("Modality", "")) or None if volume.datasets else None
    ras_axis = [int(orientation[axis][0]) for axis in (2, 1, 0)]  # slice, row, column
    return input_properties(voxels, spacing, ras_affine(volume), modality), ras_axis


def quality_of(version: ModelVersion, properties: Mapping, ras_axis: Sequence[int], members: Sequence[np.ndarray],
               voxel_mm3: float, total_volume_mm3: float) -> dict:
    """The result's ``quality`` block, also counted on ``/metrics`` (watched quantities, flag and reasons); its
    per-axis values are told in the series' order (slice, row, column) like the rest of the result."""
    structures = {s.name: s.label for s in version.structures}
    method, per_structure = structure_uncertainty(members, structures, voxel_mm3)
    properties, validated = in_series_order(properties, version.validated_input or None, ras_axis)
    quality = assess(properties, method, per_structure, validated, version.uncertainty or None,
                     f"{version.family} {version.version}")
    kinds = [c["check"] for c in quality["input"]["checks"] if not c["passed"]]
    if not version.validated_input or not version.uncertainty:
        kinds.append("not_validated")
    if version.uncertainty and quality["uncertainty"]["score"] > float(version.uncertainty["threshold"]):
        kinds.append("uncertainty")
    metrics.observe_result(version.family, version.version,
                           watched_values(properties, total_volume_mm3, quality["uncertainty"]["score"]),
                           quality["flagged"], kinds)
    return quality


def change_since_prior(settings: Settings, volume: Volume, version: ModelVersion,
                       volumes_mm3: Mapping[str, float], quality: Mapping) -> dict:
    """Compare with the patient's earlier results, then record this one with its quality flag; the
    ``change_since_prior`` block."""
    header = volume.datasets[0]
    patient = Patient.of(header)
    study_uid, study_date = str(header.get("StudyInstanceUID", "")), str(header.get("StudyDate", "") or "")
    if patient is None:
        return empty_change([], "the study has no PatientID: earlier results are never matched on the name alone")
    history = result_history(settings)
    candidates: list[PriorResult] = history.earlier(patient, study_uid)
    searched = ["result store"]
    if settings.prior_dicomweb_url:
        candidates += find_in_pacs(settings.prior_dicomweb_url, patient, study_uid,
                                   timeout=settings.prior_timeout_seconds, retry_after=settings.prior_retry_seconds)
        searched.append("PACS (QIDO-RS)")
    out = compare(study_date, volumes_mm3, version.family, version.version, candidates, searched)
    history.record(patient, PriorResult(study_uid, study_date, version.family, version.version, dict(volumes_mm3),
                                        flagged=bool(quality["flagged"]), flag_reasons=list(quality["reasons"])))
    return out

