"""The DICOM node's spool (inference/pacs/spool.py): studies filed as received, complete when quiet or released."""

from __future__ import annotations

import time

import pydicom

from inference.pacs.spool import RELEASE_GRACE_SECONDS, StudySpool
from tests.conftest import write_study


def test_a_released_study_is_complete_after_the_grace_unless_more_arrives(tmp_path):
    files = write_study(tmp_path / "study")
    spool = StudySpool(tmp_path / "spool", stable_seconds=60)
    for path in files[:2]:
        header, folder = spool.store(path.read_bytes(), "ORTHANC")
    assert folder == str(pydicom.dcmread(files[0]).StudyInstanceUID) == header.StudyInstanceUID
    assert spool.complete([folder, "not-received"]) == [folder]
    assert spool.take_stable() == []  # within the grace: a follow-up association may still come
    spool.store(files[2].read_bytes(), "ORTHANC")  # it did: the full stability wait again
    assert spool.take_stable(now=time.time() + RELEASE_GRACE_SECONDS + 0.5) == []
    spool.complete([folder])  # its release
    taken = spool.take_stable(now=time.time() + RELEASE_GRACE_SECONDS + 0.1)
    assert [p.name.split("--")[0] for p in taken] == [folder] and len(list(taken[0].glob("*.dcm"))) == 3
    assert spool.receiving() == []


def test_a_study_nobody_released_waits_the_stability_time(tmp_path):
    files = write_study(tmp_path / "study")
    spool = StudySpool(tmp_path / "spool", stable_seconds=5)
    _, folder = spool.store(files[0].read_bytes(), "SCANNER")
    assert spool.take_stable(now=time.time() + 4) == []
    assert [p.name.split("--")[0] for p in spool.take_stable(now=time.time() + 5.1)] == [folder]
