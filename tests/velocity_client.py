"""A Velocity-like client of the Radiomics Segmentation API, for the tests: its own schema
(``velocity_client.proto``, compiled by protoc into a descriptor pool of its own, never the server's
modules), plain HTTP with ``requests``, and the call sequence of the fact sheet's section 8.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

HERE = Path(__file__).resolve().parent
PROTOBUF = "application/x-protobuf"


@cache
def messages() -> dict[str, Any]:
    """The client's message classes by short name (``ModelInput``, ...), compiled from its own .proto."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "velocity.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", "--include_imports",
                        f"--descriptor_set_out={out}", "velocity_client.proto"], check=True, cwd=HERE)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    classes = message_factory.GetMessages(files, pool=pool)
    return {name.rpartition(".")[2]: cls for name, cls in classes.items() if name.startswith("Radiomics.")}


def message(name: str, **fields: Any) -> Any:
    return messages()[name](**fields)


def read_series(folder: Path) -> tuple[np.ndarray, dict]:
    """A DICOM series as Velocity holds it: int16 calibrated voxels (slice, row, column) sorted along the
    slice normal, and its Transform3D values (directions, spacing, origin in patient coordinates)."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir()) if path.is_file()]
    orientation = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, float)))
    voxels = np.stack([ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                       for ds in datasets])
    positions = [normal @ np.array(ds.ImagePositionPatient, float) for ds in datasets]
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    slice_spacing = float(np.median(np.diff(positions))) if len(datasets) > 1 else 1.0
    transform = {"x": orientation[:3], "y": orientation[3:], "z": normal,
                 "spacing": (column_spacing, row_spacing, slice_spacing),
                 "origin": np.array(datasets[0].ImagePositionPatient, float)}
    return np.rint(voxels).astype("<i2"), transform


def model_input(voxels: np.ndarray, transform: dict | None = None, channel_id: str = "1", *,
                data: bytes | None = None, size: tuple[int, int, int] | None = None) -> Any:
    """A ModelInput with one channel: ``voxels`` gzipped (or ``data`` as given), sizes from the array (or ``size``)."""
    transform = transform or {"x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1), "spacing": (1, 1, 1), "origin": (0, 0, 0)}
    depth, height, width = size or voxels.shape
    volume = message("VolumeData3D", Width=width, Height=height, Depth=depth,
                     Data=gzip.compress(voxels.astype("<i2").tobytes()) if data is None else data)
    vectors = {name: message("Vector3D", X=float(v[0]), Y=float(v[1]), Z=float(v[2]))
               for name, v in (("XAxisDirection", transform["x"]), ("YAxisDirection", transform["y"]),
                               ("ZAxisDirection", transform["z"]), ("VoxelScalingInMM", transform["spacing"]),
                               ("Origin", transform["origin"]))}
    calibrated = message("CalibratedVolume3D", Volume=volume, DataTransform=message("Transform3D", **vectors))
    channel = message("ModelInputChannel", ChannelID=channel_id, CalibratedVolume=calibrated, VolumeID="anonymous-1")
    return message("ModelInput", ClientInformation=message("ClientInformation", SoftwareVersion="velocity-test"),
                   Channels=[channel])


class VelocityClient:
    """Calls the API as Velocity does: ``Accept: application/x-protobuf`` on every call, raw protobuf POSTs."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 session: requests.Session | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": PROTOBUF, **(headers or {})})

    def get(self, path: str, answer: str, **kwargs: Any) -> Any:
        response = self.session.get(self.base + path, timeout=60, **kwargs)
        assert response.status_code == 200, (path, response.status_code, response.content[:500])
        return messages()[answer].FromString(response.content)

    def post(self, path: str, body: Any, **kwargs: Any) -> requests.Response:
        data = body if isinstance(body, bytes) else body.SerializeToString()
        return self.session.post(self.base + path, data=data, headers={"Content-Type": PROTOBUF}, timeout=120,
                                 **kwargs)

    def segment(self, model_id: str, body: Any, timeout: float = 300) -> tuple[Any, Any, dict]:
        """POST a ModelInput, poll until done or failed: (SegmentationTask, last SegmentationProgress, times ms)."""
        started = time.monotonic()
        response = self.post(f"/api/v2/Model/{model_id}/segmentation", body)
        assert response.status_code == 200, response.content[:500]
        task = messages()["SegmentationTask"].FromString(response.content)
        uploaded = time.monotonic()
        deadline = uploaded + timeout
        while True:
            progress = self.get(f"/api/v2/Model/{model_id}/segmentation/{task.SegmentationID}",
                                "SegmentationProgress")
            if progress.Progress == 100 or progress.Errors or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        times = {"upload": int((uploaded - started) * 1000), "wait": int((time.monotonic() - uploaded) * 1000)}
        return task, progress, times

    def result(self, model_id: str, segmentation_id: str) -> Any:
        return self.get(f"/api/v2/Model/{model_id}/segmentation/{segmentation_id}/result", "ModelOutput")


def mask_of(channel: Any) -> np.ndarray:
    """An output channel's mask on the input grid (depth, height, width), as Velocity places it."""
    volume = channel.Volume
    return np.frombuffer(gzip.decompress(volume.Data), np.uint8).reshape(volume.Depth, volume.Height, volume.Width)
