"""The test tool's input: DICOM files and PNG/JPEG images (files or folders), as the series it sends.

Images are converted to one new Secondary Capture series; DICOM files without the file
preamble are rewritten with one; every series is sorted as viewers send it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from inference import protocol
from inference.dicom.series import sort_by_position
from inference.dicom.writing import secondary_capture

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ToolError(Exception):
    """A failure the user can act on; printed without a traceback, exit status 1."""


@dataclass
class InputImage:
    """One file that is sent: its path and its header (pixels are read only to render)."""

    path: Path
    header: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def has_pixels(self) -> bool:
        return "Rows" in self.header and "Columns" in self.header


@dataclass
class InputSeries:
    """A series as sent: its images sorted along the slice normal (InstanceNumber within a position)."""

    uid: str
    images: list[InputImage]

    @property
    def description(self) -> str:
        return str(self.images[0].header.get("SeriesDescription", "") or "no description")

    def info(self) -> protocol.SeriesInfo:
        """What the response is checked against; images of another size than the first are listed."""
        sizes = {image.sop_instance_uid: (int(image.header.get("Rows", 0)), int(image.header.get("Columns", 0)))
                 for image in self.images if image.has_pixels}
        rows, columns = next(iter(sizes.values()), (0, 0))
        return protocol.SeriesInfo(rows, columns, [image.sop_instance_uid for image in self.images],
                                   {sop: size for sop, size in sizes.items() if size != (rows, columns)})


@dataclass
class Study:
    """What was found in the input folder, in the order it is sent."""

    series: list[InputSeries]
    converted: list[Path] = field(default_factory=list)  # PNG/JPEG files turned into DICOM
    skipped: list[Path] = field(default_factory=list)  # neither DICOM nor an image

    @property
    def images(self) -> list[InputImage]:
        return [image for series in self.series for image in series.images]

    def series_infos(self) -> dict[str, protocol.SeriesInfo]:
        return {series.uid: series.info() for series in self.series}


def read_header(path: Path) -> tuple[Dataset | None, bool]:
    """The header of a DICOM file and whether it lacks the file preamble (None when not DICOM)."""
    with open(path, "rb") as handle:
        has_preamble = handle.read(132)[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except Exception:  # pydicom raises many kinds on non-DICOM files
        return None, False
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        return None, False  # DICOMDIR, or a file that only looked like DICOM to force=True
    return ds, not has_preamble


def rewrite_with_preamble(path: Path, folder: Path) -> Path:
    """A copy of a DICOM file without preamble/file meta, written as a proper DICOM file."""
    ds = pydicom.dcmread(path, force=True)
    implicit = ds.original_encoding[0] if ds.original_encoding[0] is not None else True
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def image_pixels(image: Image.Image) -> np.ndarray:
    """Pixels of a PNG/JPEG: uint8 or uint16 grey (rows, columns), or uint8 RGB (rows, columns, 3)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.clip(np.asarray(image), 0, 65535).astype("<u2")
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def image_to_dicom(path: Path, reference: Dataset, series_uid: str, number: int) -> Dataset:
    """A Secondary Capture instance (grey or RGB) of an image file, in the series ``series_uid``."""
    with Image.open(path) as image:
        pixels = image_pixels(image)
    rgb = pixels if pixels.ndim == 3 else np.zeros((*pixels.shape, 3), np.uint8)
    ds = secondary_capture(rgb, reference, description="Converted images", series_number=9001)
    if pixels.ndim == 2:
        bits = pixels.dtype.itemsize * 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        del ds.PlanarConfiguration
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = number
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = f"converted from {path.name} by the inference test tool"
    return ds


def convert_images(paths: Sequence[Path], headers: Sequence[Dataset], folder: Path) -> list[tuple[Path, Dataset]]:
    """Write the images as one new Secondary Capture series; joins the DICOM files' study if there is one."""
    studies = {str(h.get("StudyInstanceUID", "")) for h in headers}
    reference = Dataset()
    reference.StudyInstanceUID = studies.pop() if len(studies) == 1 else generate_uid()
    reference.PatientID = str(headers[0].get("PatientID", "ANON")) if headers else "ANON"
    reference.PatientName = str(headers[0].get("PatientName", "ANON")) if headers else "ANON"
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for number, path in enumerate(paths, start=1):
        try:
            ds = image_to_dicom(path, reference, series_uid, number)
        except OSError as exc:
            raise ToolError(f"cannot convert image {path} to DICOM: {exc}") from exc
        target = folder / f"image_{number:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append((target, pydicom.dcmread(target, stop_before_pixels=True)))
    return out


def input_files(paths: Sequence[Path]) -> list[Path]:
    """The files to consider: each file given, and every file below each folder (hidden ones skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            raise ToolError(f"input {path} does not exist (give DICOM files or folders)")
    return list(dict.fromkeys(found))


def select_series(series: list[InputSeries], wanted: Sequence[str]) -> list[InputSeries]:
    """The series named by ``wanted``: a SeriesInstanceUID, or text found in the SeriesDescription (any case)."""
    if not wanted:
        return series
    chosen = [s for s in series if any(w == s.uid or w.lower() in s.description.lower() for w in wanted)]
    if not chosen:
        present = "; ".join(f"{s.description!r} ({len(s.images)} images, {s.uid})" for s in series)
        raise ToolError(f"no series matches --series {' / '.join(wanted)}; the input holds: {present}")
    return chosen


def load_study(paths: Path | Sequence[Path], work_dir: Path, series_wanted: Sequence[str] = ()) -> Study:
    """Find DICOM files and images in ``paths`` (files or folders), group them by series, sort each series.

    ``series_wanted`` keeps only the series it names (see ``select_series``).
    """
    paths = [paths] if isinstance(paths, Path) else list(paths)
    found: list[tuple[Path, Dataset]] = []
    images, skipped = [], []
    for path in input_files(paths):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
            continue
        header, needs_rewrite = read_header(path)
        if header is None:
            skipped.append(path)
            continue
        found.append((rewrite_with_preamble(path, work_dir / "rewritten") if needs_rewrite else path, header))
    if images:
        found += convert_images(images, [h for _, h in found], work_dir / "converted")
    if not found:
        raise ToolError(f"no DICOM, PNG or JPEG files found in {', '.join(map(str, paths))}")
    groups: dict[str, list[InputImage]] = {}
    for path, header in found:
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(InputImage(path, header))
    series = []
    for uid, items in groups.items():
        by_header = {id(item.header): item for item in items}
        ordered = sort_by_position([item.header for item in items])
        series.append(InputSeries(uid, [by_header[id(h)] for h in ordered]))
    series.sort(key=lambda s: (int(s.images[0].header.get("SeriesNumber", 0) or 0), s.uid))
    return Study(select_series(series, series_wanted), images, skipped)
