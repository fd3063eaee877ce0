"""The Radiomics door's own costs (``python -m bench.run --only radiomics``; ``python -m bench.radiomics``: the
conversions alone).

- conversions, in process, on a CT-sized volume (200 x 512 x 512 int16): parsing the posted ModelInput,
  checking and gunzipping it into the pipeline's volume, and encoding two structures' masks as the
  result's channels;
- Study1's HippoCrop over HTTP against the served app (``1.0-fast``): the Velocity sequence from POST to
  the last byte of the result (polling every 20 ms), against the Arterys door's round trip for the same
  series and model version.
"""

from __future__ import annotations

import gzip
import json
import statistics
import time

import numpy as np
import pydicom
import requests

from inference.config import PROJECT_ROOT
from inference.dicom.series import load_volume
from inference.protocol.client import send_inference_request
from inference.radiomics.catalogue import Catalogue
from inference.radiomics.proto import Model_pb2 as M
from inference.radiomics.volumes import channel_volume, output_channels
from models.registry import registry_for

PROTOBUF = "application/x-protobuf"
CROP = PROJECT_ROOT.parent / "shared" / "data" / "studies" / "Study1" / "13_HCropVolume"
VERSION = "1.0-fast"


def model_input(voxels: np.ndarray, channel_id: str, directions=((1, 0, 0), (0, 1, 0), (0, 0, 1)),
                spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> M.ModelInput:
    """A one-channel ModelInput of int16 ``voxels`` (slices, rows, columns)."""
    message = M.ModelInput()
    channel = message.Channels.add(ChannelID=channel_id)
    depth, height, width = voxels.shape
    volume = channel.CalibratedVolume.Volume
    volume.Width, volume.Height, volume.Depth = width, height, depth
    volume.Data = gzip.compress(voxels.astype("<i2").tobytes(), compresslevel=6)
    transform = channel.CalibratedVolume.DataTransform
    for target, value in zip((transform.XAxisDirection, transform.YAxisDirection, transform.ZAxisDirection,
                              transform.VoxelScalingInMM, transform.Origin), (*directions, spacing, origin),
                             strict=True):
        target.X, target.Y, target.Z = (float(v) for v in value)
    return message


def measure_conversions(repeats: int, shape: tuple[int, int, int] = (200, 512, 512)) -> dict:
    """Median seconds of the door's conversions on a CT-like volume of ``shape``."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((y - shape[1] / 2) ** 2 / (0.4 * shape[1]) ** 2 + (x - shape[2] / 2) ** 2 / (0.45 * shape[2]) ** 2) < 1
    voxels = np.where(body, 40, -1000) + rng.normal(0, 20, shape)
    labels = np.zeros(shape, np.uint8)
    labels[shape[0] // 4: shape[0] // 2, 200:260, 200:260] = 1
    labels[shape[0] // 2: 3 * shape[0] // 4, 260:320, 200:260] = 2
    model = Catalogue(registry_for(PROJECT_ROOT / "models" / "manifest.yaml"),
                      {"hippocampus": "get-hippocampus-volume"}).model(f"hippocampus-{VERSION}")
    body_bytes = model_input(voxels.astype("<i2"), model.channel_ids[0]).SerializeToString()
    times: dict[str, list[float]] = {"parse_s": [], "to_volume_s": [], "result_channels_s": []}
    for _ in range(repeats):
        started = time.perf_counter()
        message = M.ModelInput.FromString(body_bytes)
        parsed = time.perf_counter()
        channel_volume(message.Channels[0], max_voxels=1 << 28)
        converted = time.perf_counter()
        output_channels(model, labels, {"1": "Anterior", "2": "Posterior"})
        encoded = time.perf_counter()
        times["parse_s"].append(parsed - started)
        times["to_volume_s"].append(converted - parsed)
        times["result_channels_s"].append(encoded - converted)
    return {"shape": list(shape), "body_mb": round(len(body_bytes) / 1e6, 1),
            **{name: round(statistics.median(values), 3) for name, values in times.items()}}


def velocity_roundtrip(url: str, body: bytes, model_id: str) -> float:
    """Seconds from the POST to the result's last byte, polling progress every 20 ms."""
    session = requests.Session()
    session.headers["Accept"] = PROTOBUF
    started = time.perf_counter()
    answer = session.post(f"{url}/api/v2/Model/{model_id}/segmentation", data=body,
                          headers={"Content-Type": PROTOBUF}, timeout=300)
    answer.raise_for_status()
    uid = M.SegmentationTask.FromString(answer.content).SegmentationID
    while True:
        progress = M.SegmentationProgress.FromString(
            session.get(f"{url}/api/v2/Model/{model_id}/segmentation/{uid}", timeout=60).content)
        if progress.Errors:
            raise RuntimeError(f"segmentation failed: {progress.Errors}")
        if progress.Progress == 100:
            break
        time.sleep(0.02)
    result = session.get(f"{url}/api/v2/Model/{model_id}/segmentation/{uid}/result", timeout=60)
    result.raise_for_status()
    return time.perf_counter() - started


def measure_roundtrip(url: str, repeats: int) -> dict:
    """Median seconds of Study1's crop through Velocity's door and through the Arterys door."""
    if not CROP.is_dir():
        return {"radiomics_roundtrip_skipped": f"needs {CROP}"}
    files = sorted(CROP.iterdir())
    volume = load_volume([pydicom.dcmread(path) for path in files])
    first = volume.datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, float)
    directions = (orientation[:3], orientation[3:], np.cross(orientation[:3], orientation[3:]))
    slice_spacing, row_spacing, column_spacing = volume.spacing
    body = model_input(volume.voxels, "T1", directions, (column_spacing, row_spacing, slice_spacing),
                       tuple(float(v) for v in first.ImagePositionPatient)).SerializeToString()
    model_id = f"hippocampus-{VERSION}"
    velocity, arterys = [], []
    for _ in range(repeats + 1):  # the first of each warms up
        velocity.append(velocity_roundtrip(url, body, model_id))
        started = time.perf_counter()
        send_inference_request(url + "/hippocampus", {"model_version": VERSION}, files, timeout=300)
        arterys.append(time.perf_counter() - started)
    return {"radiomics_roundtrip_s": round(statistics.median(velocity[1:]), 3),
            "arterys_crop_roundtrip_s": round(statistics.median(arterys[1:]), 3)}


if __name__ == "__main__":
    print(json.dumps({"radiomics_conversions": measure_conversions(repeats=3)}))
