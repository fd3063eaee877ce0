"""DICOM <-> HDF5 command-line tools: a series to a volume file and back (the seed's pre/post-processing).

    python -m inference.dicom.volume_io dicom-to-hdf5 -i DICOM_DIR -o OUT.h5 -j OUT.json
    python -m inference.dicom.volume_io hdf5-to-dicom -i IN.h5 -t TEMPLATE_DIR -o OUT_DIR [--description TEXT]

``dicom-to-hdf5`` stores the stored pixel values (their own dtype, no rescale) of one series as
the dataset ``volume`` (depth, rows, columns), slices sorted by position along the normal, and
writes a JSON of its geometry and per-instance headers. ``hdf5-to-dicom`` writes ``volume`` back
as a new series (new UIDs, ImageType DERIVED) with the headers of the template series, slice k
of the volume into the template's k-th slice by position; integer volumes are stored unchanged,
float volumes are rounded and clipped to the template's stored type. Errors exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from inference.dicom.files import dicom_files_in
from inference.dicom.series import (
    Volume,
    describe_series,
    group_by_series,
    load_volume,
    slice_normal,
    slice_spacing,
    sort_by_position,
)
from inference.dicom.writing import derived_series, write_series
from inference.errors import GatewayError

VOLUME_DATASET = "volume"


class VolumeIOError(Exception):
    """A problem with the tools' input that the user can fix; the message says how."""


def read_series(folder: str | Path) -> list[Dataset]:
    """The one DICOM series of ``folder`` (recursively), sorted by slice position."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeIOError(f"{folder} is not a folder; give the folder of one DICOM series")
    files = dicom_files_in(folder)
    if not files:
        raise VolumeIOError(f"{folder} holds no DICOM files (none has the DICM preamble)")
    series = group_by_series(pydicom.dcmread(path) for path in files)
    if len(series) != 1:
        raise VolumeIOError(f"{folder} holds {len(series)} series, the tools need exactly one: "
                            f"{describe_series(series)}")
    return sort_by_position(next(iter(series.values())))


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _floats(value: Any) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def geometry(datasets: Sequence[Dataset]) -> dict:
    """Spacing (slice, row, column), origin, orientation and per-instance headers of a sorted series."""
    first = datasets[0]
    row_spacing, column_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    normal = slice_normal(first)
    return {
        "SeriesInstanceUID": str(first.SeriesInstanceUID),
        "shape": [len(datasets), int(first.Rows), int(first.Columns)],
        "spacing": [slice_spacing(datasets), row_spacing, column_spacing],
        "origin": _floats(first.get("ImagePositionPatient")),
        "orientation": _floats(first.get("ImageOrientationPatient")),
        "slice_normal": None if normal is None else normal.tolist(),
        "instances": [
            {"SOPInstanceUID": str(ds.SOPInstanceUID),
             "InstanceNumber": int(ds.get("InstanceNumber", 0) or 0),
             "ImagePositionPatient": _floats(ds.get("ImagePositionPatient")),
             "RescaleSlope": _rescale(ds)[0],
             "RescaleIntercept": _rescale(ds)[1]}
            for ds in datasets
        ],
    }


def dicom_to_hdf5(dicom_dir: str | Path, h5_path: str | Path, json_path: str | Path) -> dict:
    """Write the series of ``dicom_dir`` to ``h5_path`` (stored values) and its geometry to ``json_path``."""
    datasets = read_series(dicom_dir)
    volume = load_volume(datasets, rescale=False)
    info = geometry(volume.datasets)
    info["dtype"] = str(volume.voxels.dtype)
    with h5py.File(h5_path, "w") as h5:
        dataset = h5.create_dataset(VOLUME_DATASET, data=volume.voxels, compression="gzip", shuffle=True)
        dataset.attrs["spacing"] = info["spacing"]
        dataset.attrs["SeriesInstanceUID"] = info["SeriesInstanceUID"]
        dataset.attrs["axes"] = "slice, row, column (slices sorted by position along the normal)"
    Path(json_path).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def hdf5_to_dicom(h5_path: str | Path, template_dir: str | Path, out_dir: str | Path,
                  description: str = "Volume from HDF5") -> list[Path]:
    """Write the ``volume`` of ``h5_path`` as a new series shaped by the template series; its files."""
    template = read_series(template_dir)
    try:
        with h5py.File(h5_path, "r") as h5:
            stored = h5[VOLUME_DATASET][()]
    except (OSError, KeyError) as exc:
        raise VolumeIOError(f"{h5_path} is not an HDF5 file with a '{VOLUME_DATASET}' dataset: {exc}") from exc
    expected = (len(template), int(template[0].Rows), int(template[0].Columns))
    if stored.shape != expected:
        raise VolumeIOError(f"{h5_path} holds a volume of {stored.shape}, the template series is {expected} "
                            "(slices, rows, columns); give the template the volume came from")
    # Real-world values per slice, each with its own rescale: store_pixels undoes exactly that one.
    real = np.stack([plane.astype(np.float64) * slope + intercept
                     for plane, (slope, intercept) in zip(stored, map(_rescale, template), strict=True)])
    spacing = tuple(geometry(template)["spacing"])
    return write_series(derived_series(Volume(real, spacing, template), real, description), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.dicom.volume_io", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_h5 = commands.add_parser("dicom-to-hdf5", help="one DICOM series to an HDF5 volume and a geometry JSON")
    to_h5.add_argument("-i", "--input", required=True, help="folder of one DICOM series")
    to_h5.add_argument("-o", "--output", required=True, help="HDF5 file to write")
    to_h5.add_argument("-j", "--json", required=True, help="JSON file to write the geometry to")
    to_dicom = commands.add_parser("hdf5-to-dicom", help="an HDF5 volume back to DICOM with a template's headers")
    to_dicom.add_argument("-i", "--input", required=True, help="HDF5 file with a 'volume' dataset")
    to_dicom.add_argument("-t", "--template", required=True, help="folder of the series giving the headers")
    to_dicom.add_argument("-o", "--output", required=True, help="folder to write the new series into")
    to_dicom.add_argument("--description", default="Volume from HDF5", help="SeriesDescription of the new series")
    args = parser.parse_args(argv)
    try:
        if args.command == "dicom-to-hdf5":
            info = dicom_to_hdf5(args.input, args.output, args.json)
            print(f"wrote {args.output}: volume {info['shape']} {info['dtype']}, geometry in {args.json}")
        else:
            paths = hdf5_to_dicom(args.input, args.template, args.output, args.description)
            print(f"wrote {len(paths)} DICOM files to {args.output}")
    except (VolumeIOError, GatewayError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
