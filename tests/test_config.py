"""Settings come from the environment, with documented defaults, in one place."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from inference.config import Settings


def test_defaults_without_environment(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("INFERENCE_")]:
        monkeypatch.delenv(name)
    settings = Settings.from_env()
    assert settings.port == 8900 and settings.max_request_bytes == 2 * 1024**3
    assert settings.data_root is None and settings.api_token is None


def test_values_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERENCE_PORT", "9000")
    monkeypatch.setenv("INFERENCE_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("INFERENCE_API_TOKEN", "s3cret")
    settings = Settings.from_env()
    assert settings.port == 9000 and settings.data_root == Path(tmp_path)
    assert settings.describe()["INFERENCE_API_TOKEN"] == "***"


def test_bad_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("INFERENCE_WORKERS", "two")
    with pytest.raises(ValueError, match="INFERENCE_WORKERS must be an integer"):
        Settings.from_env()


def test_job_queues_route_commands_and_the_rest(monkeypatch):
    monkeypatch.setenv("INFERENCE_JOB_QUEUES", " get-hippocampus-volume = gpu , gaussian-blur-3d=blur ")
    settings = Settings.from_env()
    assert settings.job_queue("get-hippocampus-volume") == "gpu" and settings.job_queue("gaussian-blur-3d") == "blur"
    assert settings.job_queue("get-probability-mask") == "cpu", "commands not named go to '*', cpu by default"
    assert Settings().job_queue_routes() == {"get-hippocampus-volume": "gpu", "*": "cpu"}


@pytest.mark.parametrize("value", ["gpu", "=gpu", "get-heatmap="])
def test_bad_job_queues_name_the_variable_and_the_form(value):
    with pytest.raises(ValueError, match="INFERENCE_JOB_QUEUES.*command=queue"):
        dataclasses.replace(Settings(), job_queues=value).job_queue_routes()


def test_dicom_node_settings_from_environment(monkeypatch):
    monkeypatch.setenv("INFERENCE_PACS_DESTINATIONS", "ORTHANC@pacs:4242, BACKUP@10.0.0.2:104")
    monkeypatch.setenv("INFERENCE_PACS_STABLE_SECONDS", "2.5")
    monkeypatch.setenv("INFERENCE_PACS_ALLOWED_AES", "ORTHANC")
    settings = Settings.from_env()
    assert settings.pacs_destinations == ("ORTHANC@pacs:4242", "BACKUP@10.0.0.2:104")
    assert settings.pacs_stable_seconds == 2.5 and settings.pacs_allowed_aes == ("ORTHANC",)
    assert settings.pacs_ae_title == "HIPPOAI" and settings.pacs_port == 11112 and settings.pacs_stow_url is None


def test_bad_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("INFERENCE_PACS_STABLE_SECONDS", "soon")
    with pytest.raises(ValueError, match="INFERENCE_PACS_STABLE_SECONDS must be a number"):
        Settings.from_env()
