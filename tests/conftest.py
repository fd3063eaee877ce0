"""Shared fixtures: generated DICOM series, the shared data folder, and a real server in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from inference.dicom.writing import series_from_volume, write_series

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test (with the reason) when it is not on this machine."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared data at {path} (present on the CI machine, not in a fresh clone)")
    return path


def write_study(folder: Path, shape=(8, 32, 40), spacing=(2.0, 0.7, 0.7), seed: int = 0,
                description: str = "Generated", study_uid: str | None = None) -> list[Path]:
    """Write a synthetic int16 MR series of ``shape`` (depth, rows, columns) into ``folder``."""
    rng = np.random.default_rng(seed)
    voxels = rng.integers(0, 1200, shape).astype(np.int16)
    return write_series(series_from_volume(voxels, spacing=spacing, description=description,
                                           study_uid=study_uid), folder)


def copy_shipped_weights(folder: Path) -> None:
    """Copy every file the shipped manifest's versions name, of every family, next to a test manifest in ``folder``."""
    from models.registry import DEFAULT_MANIFEST, ModelRegistry

    folder.mkdir(parents=True, exist_ok=True)
    for family in ModelRegistry.load(DEFAULT_MANIFEST).families.values():
        for version in family.versions.values():
            target = folder / version.weights.relative_to(DEFAULT_MANIFEST.parent)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(version.weights.read_bytes())


def corrupt_manifest(folder: Path) -> Path:
    """A copy of the shipped model manifest whose weights files (copied next to it) are all corrupted."""
    import yaml

    from models.registry import DEFAULT_MANIFEST

    data = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for family in data["families"].values():
        for version in family["versions"].values():
            weights = folder / version["weights"]
            if not weights.exists():
                blob = bytearray((DEFAULT_MANIFEST.parent / version["weights"]).read_bytes())
                blob[1000:1008] = b"corrupt!"
                weights.write_bytes(bytes(blob))
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _metrics_folder_not_leaked() -> Iterator[None]:
    """gunicorn.conf.py, run in-process by a few tests, names a metrics folder in ``os.environ``; undo it after."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    if before is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    """A small generated series (8 slices of 32 x 40), as DICOM files on disk."""
    return write_study(tmp_path / "study")


@pytest.fixture
def make_study(tmp_path: Path) -> Callable[..., list[Path]]:
    """Factory: ``make_study(name, shape=..., spacing=...)`` writes a generated series."""
    return lambda name="study", **kwargs: write_study(tmp_path / name, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A gateway served by gunicorn with the project's config, in a subprocess."""

    def __init__(self, env: dict[str, str], log_dir: Path, args: list[str] | None = None,
                 ready_timeout: float = 120, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server gets its own metrics folder (gunicorn.conf.py makes one) unless ``env`` names one: a
        # folder inherited from this process would be shared, and every gunicorn empties its folder at start.
        # Its stores (jobs, users, history, audit) are its own too unless ``env`` names a folder: the checkout's
        # output/ may hold another release's stores, which a server refuses (inference-migrate).
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        full_env = {**inherited, "INFERENCE_PORT": str(self.port), "INFERENCE_HOST": "127.0.0.1",
                    "INFERENCE_WORKERS": "1", "INFERENCE_THREADS": "4",
                    "INFERENCE_OUTPUT_ROOT": str(Path(log_dir) / f"output-{self.port}"), **env}
        # ``{port}`` in ``args`` is replaced by the port chosen for this server
        command = [a.replace("{port}", str(self.port)) for a in args] if args else \
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        self.log_path = Path(log_dir) / f"gateway-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if wait:
                self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/healthcheck", timeout=2).text == "READY":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not READY after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    """The full server under gunicorn, mocks enabled as ``mock_server.py`` serves them (the 3D mask the
    default command), with a data root for studyPath and jobs."""
    root = tmp_path_factory.mktemp("server")
    (root / "data").mkdir()
    running = RunningServer({"INFERENCE_DATA_ROOT": str(root / "data"), "INFERENCE_ENABLE_MOCKS": "1",
                             "INFERENCE_DEFAULT_COMMAND": "get-probability-mask",
                             "INFERENCE_OUTPUT_ROOT": str(root / "jobs")}, root)
    running.data_root = root / "data"
    yield running
    running.stop()


@pytest.fixture(scope="session")
def study1_crop() -> tuple[Path, np.ndarray, dict]:
    """Study1's HippoCrop series as a Velocity-like client reads it: folder, int16 voxels, Transform3D values."""
    from tests.velocity_client import read_series

    folder = next(shared_data("studies", "Study1").glob("*HCrop*"))
    voxels, transform = read_series(folder)
    return folder, voxels, transform


def require(missing_reason: str | None) -> None:
    """Skip the test with ``missing_reason`` (a program it needs is absent), or fail when ``CI`` is set."""
    if missing_reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {missing_reason}")
    pytest.skip(missing_reason)


@pytest.fixture(scope="session")
def phantom_networks(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Small segmentation networks trained on synthetic spheres (tests/declared_models.py), once per session."""
    from tests.declared_models import trained_networks

    return trained_networks(tmp_path_factory.mktemp("phantom-networks"))
