"""Every folder setting is created, or found writable, at start; one that cannot work stops the start with one
line naming the setting, its value and why (gunicorn and the DICOM node; the celery worker in test_celery)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from inference.config import Settings
from inference.folders import NODE_FOLDERS, UnusableFolder, check_folders, problem
from inference.protocol.client import build_multipart_request, related_content_type
from tests.conftest import PROJECT_ROOT, RunningServer, free_port, write_study


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A plain file: no folder can be made below it (whoever runs the test, root included)."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


SETTINGS = {"spool_dir": "INFERENCE_SPOOL_DIR", "output_root": "INFERENCE_OUTPUT_ROOT",
            "pacs_root": "INFERENCE_PACS_ROOT", "model_cache": "INFERENCE_MODEL_CACHE",
            "history_db": "INFERENCE_HISTORY_DB", "audit_log": "INFERENCE_AUDIT_LOG"}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_folder_setting_is_created_or_refused_naming_it(tmp_path, a_file, name):
    files = {"history_db": "history.sqlite3", "audit_log": "audit.jsonl"}
    places = {setting: tmp_path / "new" / setting / files.get(setting, "") for setting in SETTINGS}
    roomy = dataclasses.replace(Settings(), **places)
    check_folders(roomy, NODE_FOLDERS)
    assert all((tmp_path / "new" / setting).is_dir() for setting in SETTINGS)
    broken = dataclasses.replace(roomy, **{name: a_file / "below"})
    with pytest.raises(UnusableFolder) as refused:
        check_folders(broken, NODE_FOLDERS)
    line = str(refused.value)
    assert line.startswith(f"{SETTINGS[name]}={a_file / 'below'}: ") and "\n" not in line, line
    assert "Not a directory" in line or "not a folder" in line, line


def test_a_file_setting_naming_a_folder_is_refused(tmp_path):
    settings = dataclasses.replace(Settings(), output_root=tmp_path, history_db=tmp_path)
    assert problem(settings, "history_db") == f"INFERENCE_HISTORY_DB={tmp_path}: it is a folder, not a file"


def test_gunicorn_creates_a_missing_spool_folder_and_a_spilled_upload_is_served(tmp_path):
    """The issue's case: INFERENCE_SPOOL_DIR naming a folder that did not exist started READY, then answered the
    first upload that spilled to disk with a 500 (FileNotFoundError)."""
    spool = tmp_path / "not" / "yet" / "spool"
    server = RunningServer({"INFERENCE_SPOOL_DIR": str(spool), "INFERENCE_SPOOL_MEMORY_BYTES": "4096",
                            "INFERENCE_ENABLE_MOCKS": "1", "INFERENCE_OUTPUT_ROOT": str(tmp_path / "out")}, tmp_path)
    try:
        encoder = build_multipart_request({"inference_command": "get-probability-mask"},
                                          write_study(tmp_path / "study", shape=(4, 32, 32)))
        response = requests.post(server.url + "/", data=encoder.to_string(),
                                 headers={"Content-Type": related_content_type(encoder)}, timeout=60)
        assert response.status_code == 200, response.text
        assert spool.is_dir()
    finally:
        server.stop()


def test_gunicorn_refuses_to_start_with_an_unusable_folder_in_one_line(tmp_path, a_file):
    server = RunningServer({"INFERENCE_MODEL_CACHE": str(a_file / "cache"),
                            "INFERENCE_OUTPUT_ROOT": str(tmp_path / "out")}, tmp_path, wait=False)
    try:
        assert server.process.wait(60) != 0
    finally:
        server.stop()
    expected = f"gateway not started: INFERENCE_MODEL_CACHE={a_file / 'cache'}: it cannot be created (Not a directory)"
    assert [line for line in server.log().splitlines() if "not started" in line] == [expected], server.log()


def test_the_dicom_node_refuses_to_start_with_an_unusable_folder_in_one_line(tmp_path, a_file):
    env = {"INFERENCE_PACS_ROOT": str(a_file / "pacs"), "INFERENCE_OUTPUT_ROOT": str(tmp_path / "out"),
           "INFERENCE_PACS_PORT": str(free_port()), "PATH": "/usr/bin:/bin"}
    node = subprocess.run([sys.executable, "dicom_node.py"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert node.returncode == 2, node.stderr
    assert f"dicom_node: INFERENCE_PACS_ROOT={a_file / 'pacs'}: it cannot be created (Not a directory)" in \
        node.stderr.splitlines(), node.stderr
