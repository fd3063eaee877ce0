"""inference.disk_space: the free-space check and ENOSPC as a 507 naming the store."""

from __future__ import annotations

import errno

import pytest

from inference import disk_space
from inference.disk_space import StoreFull, check_free_space, disk_full_as, free_space_bytes, is_disk_full


def test_check_free_space_refuses_below_the_floor_and_names_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_space, "free_space_bytes", lambda folder: 100 * disk_space.MIB)
    assert check_free_space("output", tmp_path, min_free_mb=50) == 100 * disk_space.MIB
    with pytest.raises(StoreFull) as caught:
        check_free_space("spool", tmp_path, min_free_mb=512)
    assert caught.value.status == 507
    assert caught.value.details == {"store": "spool"}
    assert "INFERENCE_SPOOL_DIR" in caught.value.message and "100 MiB free" in caught.value.message


def test_free_space_of_a_missing_folder_is_its_parents(tmp_path):
    assert 0 < free_space_bytes(tmp_path / "not" / "yet")
    assert abs(free_space_bytes(tmp_path / "not" / "yet") - free_space_bytes(tmp_path)) < 64 * disk_space.MIB


def test_disk_full_as_turns_enospc_into_store_full_and_keeps_other_errors():
    with pytest.raises(StoreFull) as caught, disk_full_as("output"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.details == {"store": "output"} and is_disk_full(caught.value)
    with pytest.raises(PermissionError), disk_full_as("output"):
        raise PermissionError(errno.EACCES, "denied")


def test_is_disk_full_follows_the_cause_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("writing the result failed") from error
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(RuntimeError("no"))
    assert not is_disk_full(OSError(errno.EIO, "io"))


def test_the_setting_has_a_documented_default(monkeypatch):
    from inference.config import Settings
    monkeypatch.delenv("INFERENCE_MIN_FREE_SPACE_MB", raising=False)
    assert Settings.from_env().min_free_space_mb == 512
    monkeypatch.setenv("INFERENCE_MIN_FREE_SPACE_MB", "64")
    assert Settings.from_env().min_free_space_mb == 64


def test_store_of_names_the_store_holding_the_file_the_error_names(tmp_path):
    folders = {"spool": tmp_path / "spool", "output": tmp_path / "out"}
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "job" / "x.dcm"))
    assert disk_space.store_of(error, folders) == "output"
    assert disk_space.store_of(StoreFull("spool"), folders) == "spool"


def test_with_storage_turns_ready_into_degraded_naming_the_low_store(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_space, "free_space_bytes", lambda folder: 10 * disk_space.MIB)
    folders = {"output": tmp_path}
    assert disk_space.with_storage("READY", folders, min_free_mb=5) == "READY"
    degraded = disk_space.with_storage("READY", folders, min_free_mb=64)
    assert degraded.startswith("DEGRADED: ") and "output store (INFERENCE_OUTPUT_ROOT)" in degraded
    assert disk_space.with_storage("FAILED: x", folders, min_free_mb=64).startswith("FAILED: x; ")
