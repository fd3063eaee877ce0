"""Between the Radiomics API's volumes and the pipeline's: a posted channel to a ``Volume``, label masks to
output channels.

A channel carries calibrated voxels, gzip-compressed, [Depth][Height][Width] with Width fastest: numpy's
C order of (slices, rows, columns), the order of ``load_volume``'s voxels, so no axis moves. Its
Transform3D is read in DICOM patient coordinates (LPS, mm): X/Y/ZAxisDirection are the directions of the
column, row and slice indices, Origin the centre of voxel (0, 0, 0).
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np

from inference.dicom.series import Geometry, Volume
from inference.radiomics.catalogue import CatalogueModel
from inference.radiomics.proto import Model_pb2 as M
from inference.radiomics.proto import Primitives3D_pb2 as P

ERROR_CODES = M.SegmentationProgress.ErrorCodes
GZIP_MAGIC = b"\x1f\x8b"


class InputRejected(Exception):
    """A posted input the server cannot run: the protocol's ErrorCode and a sentence saying why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def gunzip_exact(data: bytes, expected: int, where: str) -> bytes:
    """``data`` gunzipped, which must be exactly ``expected`` bytes; never more than ``expected + 1`` are made.

    A gzip bomb stops one byte past ``expected`` (ErrorCode 4), as does a stream shorter than
    ``expected``; a stream that is not gzip, is damaged or truncated is ErrorCode 3. Several gzip
    members in a row are one stream (RFC 1952).
    """
    if not data.startswith(GZIP_MAGIC):
        raise InputRejected(ERROR_CODES.DecompressionError,
                            f"{where}: Data is not a gzip stream (RFC 1952 starts with 1F 8B; zlib or raw deflate "
                            "are not accepted)")
    out = bytearray()
    rest = data
    while rest:
        if not rest.startswith(GZIP_MAGIC):
            raise InputRejected(ERROR_CODES.DecompressionError, f"{where}: Data has bytes after its gzip stream")
        stream = zlib.decompressobj(wbits=31)
        try:
            out += stream.decompress(rest, expected + 1 - len(out))
            while not stream.eof and len(out) <= expected and stream.unconsumed_tail:
                out += stream.decompress(stream.unconsumed_tail, expected + 1 - len(out))
        except zlib.error as exc:
            raise InputRejected(ERROR_CODES.DecompressionError, f"{where}: Data is damaged gzip ({exc})") from None
        if len(out) > expected:
            raise InputRejected(ERROR_CODES.DecompressionBufferSizeMismatch,
                                f"{where}: Data holds more than Width x Height x Depth x 2 = {expected} bytes")
        if not stream.eof:
            raise InputRejected(ERROR_CODES.DecompressionError, f"{where}: Data is truncated gzip (no end of stream)")
        rest = stream.unused_data
    if len(out) != expected:
        raise InputRejected(ERROR_CODES.DecompressionBufferSizeMismatch,
                            f"{where}: Data holds {len(out)} bytes, Width x Height x Depth x 2 = {expected}")
    return bytes(out)


def _vector(message: P.Vector3D, where: str, *, unit: bool) -> tuple[float, float, float]:
    values = np.array([message.X, message.Y, message.Z], float)
    if not np.all(np.isfinite(values)):
        raise InputRejected(ERROR_CODES.UnknownClientError, f"{where} must be finite numbers")
    if unit:
        norm = float(np.linalg.norm(values))
        if abs(norm - 1) > 1e-3:
            raise InputRejected(ERROR_CODES.UnknownClientError, f"{where} must be a unit vector, its length is {norm}")
    return float(values[0]), float(values[1]), float(values[2])


def channel_volume(channel: M.ModelInputChannel, max_voxels: int) -> Volume:
    """A posted channel as a ``Volume`` (float32 calibrated voxels, spacing, geometry); ``InputRejected`` else.

    ``max_voxels`` (``INFERENCE_MAX_SERIES_VOXELS``) bounds Width x Height x Depth before anything is
    decompressed.
    """
    where = f"channel {channel.ChannelID!r}"
    if not channel.CalibratedVolume.HasField("Volume"):
        raise InputRejected(ERROR_CODES.UnknownClientError, f"{where} has no CalibratedVolume.Volume")
    data = channel.CalibratedVolume.Volume
    if data.DataType != P.VolumeData3D.LittleEndianSignedInt16:
        raise InputRejected(ERROR_CODES.UnknownClientError,
                            f"{where}: DataType {P.VolumeData3D.DataTypes.Name(data.DataType)} is not accepted; "
                            "send LittleEndianSignedInt16 (0) calibrated voxels")
    if data.CompressionMethod != P.VolumeData3D.Gzip:
        raise InputRejected(ERROR_CODES.DecompressionError,
                            f"{where}: CompressionMethod {data.CompressionMethod} is not Gzip (0)")
    width, height, depth = data.Width, data.Height, data.Depth
    if not (width and height and depth):
        raise InputRejected(ERROR_CODES.UnknownClientError,
                            f"{where}: Width, Height and Depth must be positive, got {width} x {height} x {depth}")
    if width * height * depth > max_voxels:
        raise InputRejected(ERROR_CODES.UnknownClientError,
                            f"{where}: {width} x {height} x {depth} voxels exceed this server's limit of {max_voxels}")
    raw = gunzip_exact(data.Data, width * height * depth * 2, where)
    voxels = np.frombuffer(raw, dtype="<i2").reshape(depth, height, width).astype(np.float32)
    transform = channel.CalibratedVolume.DataTransform
    if not channel.CalibratedVolume.HasField("DataTransform") or not transform.HasField("VoxelScalingInMM"):
        raise InputRejected(ERROR_CODES.UnknownClientError, f"{where} has no DataTransform.VoxelScalingInMM")
    sx, sy, sz = _vector(transform.VoxelScalingInMM, f"{where}: VoxelScalingInMM", unit=False)
    if min(sx, sy, sz) <= 0:
        raise InputRejected(ERROR_CODES.UnknownClientError, f"{where}: VoxelScalingInMM must be positive")
    axes = []
    for name, default in (("XAxisDirection", (1.0, 0.0, 0.0)), ("YAxisDirection", (0.0, 1.0, 0.0)),
                          ("ZAxisDirection", (0.0, 0.0, 1.0))):
        given = transform.HasField(name)
        axes.append(_vector(getattr(transform, name), f"{where}: {name}", unit=True) if given else default)
    origin = _vector(transform.Origin, f"{where}: Origin", unit=False)
    geometry = Geometry(axes[0], axes[1], axes[2], origin)
    return Volume(voxels, (sz, sy, sx), [], geometry, uid=channel.VolumeID or channel.ChannelID)


def output_channels(model: CatalogueModel, labels: np.ndarray, label_map: dict[str, str]) -> list[M.ModelOutputChannel]:
    """One output channel per structure of the version: its byte mask (0/1) of ``labels``, gzip-compressed."""
    depth, height, width = labels.shape
    label_of = {name: int(value) for value, name in label_map.items()}
    channels = []
    for index, structure in enumerate(model.version.structures):
        mask = (labels == label_of.get(structure.name, structure.label)).astype(np.uint8)
        volume = P.VolumeData3D(Width=width, Height=height, Depth=depth, DataType=P.VolumeData3D.Byte,
                                Data=gzip.compress(mask.tobytes(), compresslevel=6, mtime=0))
        channels.append(M.ModelOutputChannel(Structure=model.structure(index), Volume=volume))
    return channels
