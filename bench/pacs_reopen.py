"""How soon Orthanc reopens an association while routing one study (the node's release grace).

The DICOM node completes a study from a routing PACS when the PACS releases its association, after
``INFERENCE_PACS_RELEASE_GRACE_SECONDS`` for a follow-up association. Orthanc 1.10 sends a study on
one association, but opened a second one for a study mixing SOP classes and transfer syntaxes
(``mixed_syntax_study``). This sends such a study to Debian's Orthanc, lets it route the study to
a recording storage SCP, and prints the gap between the release and the next association, per run:

    python -m bench.pacs_reopen [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from bench.pacs_services import Orthanc, c_store, free_port, orthanc_missing
from inference.dicom.writing import series_from_volume, write_series


def mixed_syntax_study(folder: Path, description: str = "Report me", seed: int = 0) -> list[Path]:
    """One study Orthanc 1.10 routes on two associations: a 3-slice MR series, its RLE Lossless copy
    (another series), and one CT and one Secondary Capture instance (other SOP classes)."""
    voxels = np.random.default_rng(seed).integers(0, 1200, (3, 16, 20)).astype(np.int16)
    plain = write_series(series_from_volume(voxels, spacing=(2.0, 0.7, 0.7), description=description), folder)
    files = list(plain)
    copies = [(RLELossless, None), (None, "1.2.840.10008.5.1.4.1.1.2"), (None, "1.2.840.10008.5.1.4.1.1.7")]
    for index, (syntax, sop_class) in enumerate(copies):
        ds = pydicom.dcmread(plain[index])
        if syntax is not None:
            ds.compress(syntax)
        if sop_class is not None:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = folder / f"other-{index:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
    return files


class RecordingSCP:
    """A storage SCP noting when each association is accepted and released."""

    def __init__(self, ae_title: str = "HIPPOAI") -> None:
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.stored = 0
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ACCEPTED, lambda event: self._note("accepted")),
            (evt.EVT_RELEASED, lambda event: self._note("released")),
            (evt.EVT_C_STORE, self._on_store)])

    def _note(self, kind: str) -> None:
        with self._lock:
            self.events.append((time.monotonic(), kind))

    def _on_store(self, event) -> int:
        with self._lock:
            self.stored += 1
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def follow_up_gaps(runs: int) -> list[float | None]:
    """Per run, seconds from Orthanc's first release to its next association (None: it sent all on one)."""
    gaps: list[float | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        scp = RecordingSCP()
        orthanc = Orthanc(Path(tmp) / "orthanc", node_port=scp.port, stable_age=1)
        try:
            for run in range(runs):
                files = mixed_syntax_study(Path(tmp) / f"study{run}", seed=run)
                scp.events.clear()
                scp.stored = 0
                c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
                deadline = time.monotonic() + 30
                while scp.stored < len(files) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
                kinds = [kind for _, kind in scp.events]
                if kinds.count("accepted") < 2:
                    gaps.append(None)
                    continue
                released = next(t for t, kind in scp.events if kind == "released")
                reopened = [t for t, kind in scp.events if kind == "accepted"][1]
                gaps.append(round(reopened - released, 4))
        finally:
            orthanc.stop()
            scp.stop()
    return gaps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pacs_reopen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="studies routed (default %(default)s)")
    args = parser.parse_args(argv)
    missing = orthanc_missing()
    if missing:
        raise SystemExit(missing)
    gaps = follow_up_gaps(args.runs)
    measured = [gap for gap in gaps if gap is not None]
    print(json.dumps({"follow_up_gap_s": gaps, "median_s": statistics.median(measured) if measured else None,
                      "max_s": max(measured) if measured else None}))


if __name__ == "__main__":
    main()
