"""What a reviewer's steps cost the server: reading a SEG onto its source series, a whole correction (two SEGs
read, Dice, a new SR), and drawing the review images.

    python -m bench.review [--runs 9]     # one JSON line on stdout: medians and ranges in ms

On the crop series of Study1 (``../shared/data``; the numbers are about a real MR series' size), with a
SEG written by ``inference.dicom.results`` on it, as a correction from a viewer would be.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

from inference.config import Settings
from inference.dicom.results import Algorithm, segmentation
from inference.dicom.series import sort_by_position
from inference.review import correction
from inference.review.images import overlay_slices
from models.registry import registry_for

CROP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "studies" / "Study1" / "13_HCropVolume"


def timed(call, runs: int) -> dict:
    """Median, min and max milliseconds of ``call()`` over ``runs`` calls."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.review", description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args(argv)
    if not CROP.is_dir():
        print(f"bench.review needs the shared data ({CROP} is missing)", file=sys.stderr)
        return 2
    source = sort_by_position([pydicom.dcmread(p) for p in sorted(CROP.rglob("*.dcm"))])
    structures = registry_for(Settings().model_manifest).family("hippocampus").resolve("1.0-fast").structures
    labels = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    depth, rows, columns = labels.shape
    labels[depth // 4: 3 * depth // 4, rows // 4: rows // 2, columns // 4: 3 * columns // 4] = structures[0].label
    labels[depth // 4: 3 * depth // 4, rows // 2: 3 * rows // 4, columns // 4: 3 * columns // 4] = structures[1].label
    shifted = np.roll(labels, 2, axis=2)
    buffers = []
    for mask in (labels, shifted):
        buffer = io.BytesIO()
        segmentation(source, mask, structures, Algorithm("bench", "1")).save_as(buffer, enforce_file_format=True)
        buffers.append(buffer.getvalue())
    model_bytes, corrected_bytes = buffers

    def whole_correction() -> None:
        model = correction.read_segmentation(model_bytes, source, structures)
        corrected = correction.read_segmentation(corrected_bytes, source, structures)
        correction.compare(model.labels, corrected.labels, structures, correction.voxel_volume_mm3(source))
        correction.corrected_report(source, corrected, structures, Algorithm("bench", "1"), "bench^")

    print(json.dumps({
        "series": f"{depth} x {rows} x {columns}", "seg_bytes": len(model_bytes), "runs": args.runs,
        "read_seg": timed(lambda: correction.read_segmentation(model_bytes, source, structures), args.runs),
        "correction": timed(whole_correction, args.runs),
        "review_images": timed(lambda: overlay_slices(source, labels, structures), args.runs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
