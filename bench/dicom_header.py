"""Benchmark of header reading: the fast reader (``inference.dicom.header``) against pydicom's partial reads.

    python -m bench.dicom_header               # one JSON line: median microseconds per file, per way and study
    python -m bench.dicom_header --repeats 9

Each way reads every file of a study from bytes in memory (as request parts are), ``repeats`` times,
alternating the ways so all see the same machine load; a figure is the median over repeats of the mean
per file. Ways: ``fast`` (``read_header``), ``fast_checked`` (plus ``check_attributes``, what validation
does per instance), ``dcmread`` (``stop_before_pixels=True``) and ``dcmread_partial`` (also
``specific_tags`` = the attribute table's tags and ``defer_size``). Studies: the benchmark's small one
(24 files) and ``../shared/data/studies/Study1`` when present.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from bench.study import cached_study
from inference.config import PROJECT_ROOT
from inference.dicom.attributes import ATTRIBUTES, check_attributes
from inference.dicom.header import read_header

STUDY1 = PROJECT_ROOT.parent / "shared" / "data" / "studies" / "Study1"
#: What validation and the handlers read: the attribute table, the transfer syntax's, Pixel Data's position.
NEEDED_TAGS = [attribute.tag for attribute in ATTRIBUTES]
DEFER_SIZE = 1024


def _partial(blob: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True, specific_tags=NEEDED_TAGS, defer_size=DEFER_SIZE)


WAYS: dict[str, Callable[[bytes], object]] = {
    "fast": read_header,
    "fast_checked": lambda blob: check_attributes(read_header(blob), "bench"),
    "dcmread": lambda blob: pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True),
    "dcmread_partial": _partial,
}


def measure(blobs: Sequence[bytes], repeats: int) -> dict:
    """Median microseconds per file of each way on ``blobs``, and each way's ratio to the fast reader."""
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(repeats):
        for name, read in WAYS.items():
            started = time.perf_counter()
            for blob in blobs:
                read(blob)
            times[name].append((time.perf_counter() - started) / len(blobs) * 1e6)
    medians = {name: round(statistics.median(values), 1) for name, values in times.items()}
    return {"files": len(blobs), "us_per_file": medians,
            "ratio_to_fast": {name: round(value / medians["fast"], 2) for name, value in medians.items()}}


def studies() -> dict[str, list[Path] | str]:
    """The studies measured: the small one, and Study1 or why it is skipped."""
    from inference.dicom.files import dicom_files_in

    found: dict[str, list[Path] | str] = {"small": cached_study("small")}
    found["study1"] = dicom_files_in(STUDY1) if STUDY1.is_dir() else "needs ../shared/data/studies/Study1"
    return found


def measure_headers(repeats: int = 7) -> dict:
    """The header section of ``bench.run``: per-file medians of every way on every study present."""
    out: dict = {}
    for name, files in studies().items():
        if isinstance(files, str):
            out[f"header_{name}_skipped"] = files
            continue
        out[f"header_{name}"] = measure([path.read_bytes() for path in files], repeats)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dicom_header", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each way over each study (default 7)")
    args = parser.parse_args(argv)
    print(json.dumps(measure_headers(max(1, args.repeats))), flush=True)


if __name__ == "__main__":
    main()
