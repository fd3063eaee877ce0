"""Synthetic DICOM studies for the benchmark, generated once and cached in ``bench/.cache``.

``large`` is 256 slices of 512 x 512 int16 (about 134 MB of pixel data), ``small`` is 24 slices
of 256 x 256: the two sizes the issue's targets are stated for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from inference.dicom.writing import series_from_volume, write_series

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SHAPES: dict[str, tuple[int, int, int]] = {"large": (256, 512, 512), "small": (24, 256, 256)}
MANIFEST = "study.json"


def generate_study(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> list[Path]:
    """Write one int16 MR series of ``shape`` (depth, rows, columns) into ``folder`` as DICOM files."""
    rng = np.random.default_rng(seed)
    voxels = rng.integers(0, 1200, size=shape, dtype=np.int16)
    return write_series(series_from_volume(voxels, spacing=(1.0, 0.5, 0.5), description=f"Bench {shape}"), folder)


def cached_study(name: str, shape: tuple[int, int, int] | None = None, cache_dir: Path = CACHE_DIR) -> list[Path]:
    """The files of study ``name`` (``large``, ``small``, or any name with ``shape``), generated if absent.

    A study counts as cached when its manifest names the same shape and all its files exist;
    it is generated in a temporary folder and moved into place, so an interrupted run leaves no
    half-written study behind.
    """
    shape = tuple(shape or SHAPES[name])
    folder = cache_dir / name
    manifest = folder / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        files = [folder / f for f in recorded["files"]]
        if tuple(recorded["shape"]) == shape and all(f.is_file() for f in files):
            return files
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cache_dir))
    try:
        files = generate_study(staging, shape)
        (staging / MANIFEST).write_text(json.dumps({"shape": list(shape), "files": [f.name for f in files]}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [folder / f.name for f in files]


def payload_bytes(files: list[Path]) -> int:
    """Total size of a study's files on disk (what a request carries, multipart framing aside)."""
    return sum(f.stat().st_size for f in files)
