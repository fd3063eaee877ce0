"""The Radiomics door's conversions and catalogue, in process: bounded gunzip, a channel to the pipeline's
volume, masks to output channels, and the model list following the registry's ``add``."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
import zlib

import numpy as np
import pytest

from inference.radiomics.catalogue import Catalogue, model_id, version_numbers
from inference.radiomics.proto import Model_pb2 as M
from inference.radiomics.volumes import InputRejected, channel_volume, gunzip_exact, output_channels
from models.registry import DEFAULT_MANIFEST, ModelRegistry, add_version
from tests.conftest import copy_shipped_weights

COMMANDS = {"hippocampus": "get-hippocampus-volume"}


def channel(voxels: np.ndarray, **transform) -> M.ModelInputChannel:
    message = M.ModelInputChannel(ChannelID="T1")
    depth, height, width = voxels.shape
    volume = message.CalibratedVolume.Volume
    volume.Width, volume.Height, volume.Depth = width, height, depth
    volume.Data = gzip.compress(voxels.astype("<i2").tobytes())
    target = message.CalibratedVolume.DataTransform
    for name, value in {"VoxelScalingInMM": (0.5, 0.6, 2.0), **transform}.items():
        vector = getattr(target, name)
        vector.X, vector.Y, vector.Z = value
    return message


def test_a_gzip_bomb_is_stopped_one_byte_past_the_stated_size():
    """256 MiB of zeros in about 256 KB of gzip, stated as 1000 bytes: refused, and little memory used."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join([*(packer.compress(bytes(1 << 20)) for _ in range(256)), packer.flush()])
    tracemalloc.start()
    with pytest.raises(InputRejected) as refused:
        gunzip_exact(bomb, 1000, "channel")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert refused.value.code == 4 and peak < 1 << 20, peak


def test_gunzip_accepts_several_members_and_refuses_what_follows_the_stream():
    data = bytes(range(200))
    assert gunzip_exact(gzip.compress(data[:50]) + gzip.compress(data[50:]), 200, "c") == data
    with pytest.raises(InputRejected, match="after its gzip stream") as refused:
        gunzip_exact(gzip.compress(data) + b"junk", 200, "c")
    assert refused.value.code == 3


def test_a_channel_becomes_the_pipelines_volume():
    """[Depth][Height][Width] is (slices, rows, columns); spacing is given along i, j, k and kept as (k, j, i)."""
    voxels = np.arange(3 * 4 * 5, dtype="<i2").reshape(3, 4, 5) - 30
    volume = channel_volume(channel(voxels, XAxisDirection=(0, 1, 0), YAxisDirection=(0, 0, -1),
                                    ZAxisDirection=(-1, 0, 0), Origin=(10, 20, 30)), max_voxels=100)
    assert volume.voxels.dtype == np.float32 and np.array_equal(volume.voxels, voxels)
    assert volume.spacing == (2.0, 0.6, 0.5) and volume.datasets == [] and volume.series_uid == "T1"
    assert volume.geometry.column_direction == (0, 1, 0) and volume.geometry.slice_direction == (-1, 0, 0)
    assert volume.geometry.origin == (10, 20, 30)


@pytest.mark.parametrize(("transform", "words"), [
    ({"XAxisDirection": (0.5, 0, 0)}, "unit vector"),
    ({"VoxelScalingInMM": (1, 0, 1)}, "positive"),
    ({"Origin": (float("nan"), 0, 0)}, "finite"),
])
def test_a_transform_that_places_nothing_is_refused(transform, words):
    with pytest.raises(InputRejected, match=words) as refused:
        channel_volume(channel(np.zeros((2, 2, 2)), **transform), max_voxels=100)
    assert refused.value.code == 2


def test_a_stated_size_over_the_limit_is_refused_before_decompressing():
    message = channel(np.zeros((2, 2, 2)))
    message.CalibratedVolume.Volume.Depth = 1 << 20
    with pytest.raises(InputRejected, match="exceed this server's limit"):
        channel_volume(message, max_voxels=1 << 20)


def test_one_output_channel_per_structure_on_the_input_grid():
    catalogue = Catalogue(ModelRegistry.load(DEFAULT_MANIFEST), COMMANDS)
    model = catalogue.model("hippocampus-1.0")
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3], labels[2, 0, 0] = 1, 2
    channels = output_channels(model, labels, {"1": "Anterior", "2": "Posterior"})
    assert [c.Structure.StructureID for c in channels] == ["Anterior", "Posterior"]
    masks = [np.frombuffer(gzip.decompress(c.Volume.Data), np.uint8).reshape(3, 4, 5) for c in channels]
    assert np.array_equal(masks[0], labels == 1) and np.array_equal(masks[1], labels == 2)
    assert all((c.Volume.Width, c.Volume.Height, c.Volume.Depth, c.Volume.DataType) == (5, 4, 3, 1)
               for c in channels)
    assert channels[0].Structure.Color.R == 255 and channels[1].Structure.InputChannelID == "T1"


def test_a_version_added_with_the_registry_command_is_listed(tmp_path):
    """Nothing configured twice: ``add`` alone puts the new version in the Radiomics model list."""
    shutil.copy(DEFAULT_MANIFEST, tmp_path / "manifest.yaml")
    copy_shipped_weights(tmp_path)  # every shipped version's file, of every family
    retrained = tmp_path / "retrained.pt"
    retrained.write_bytes((tmp_path / "hippocampus_unet.pt").read_bytes() + b"retrained")
    add_version(tmp_path / "manifest.yaml", "hippocampus", "1.9", retrained, None, like="1.0")  # a name not shipped
    catalogue = Catalogue(ModelRegistry.load(tmp_path / "manifest.yaml"), COMMANDS)
    assert "hippocampus-1.9" in catalogue.models
    [family] = catalogue.collection().Models
    assert [v.ID for v in family.ModelVersions][-1] == "hippocampus-1.9"  # ordered by CreatedOn
    assert (family.ModelVersions[-1].MajorVersion, family.ModelVersions[-1].MinorVersion) == (1, 9)


def test_model_ids_and_version_numbers():
    version = ModelRegistry.load(DEFAULT_MANIFEST).family("hippocampus").versions["1.0-fast"]
    assert model_id(version) == "hippocampus-1.0-fast"
    assert version_numbers("1.0-fast") == (1, 0) and version_numbers("2") == (2, 0)
    assert version_numbers("beta") == (0, 0)
