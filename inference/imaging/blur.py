"""Separable 3D Gaussian blur of a volume, edge ('nearest') padding, fast on CPU threads or CUDA.

Each axis gets one 1D Gaussian (the kernel ``scipy.ndimage.gaussian_filter`` uses: radius
``int(truncate * sigma + 0.5)``, normalised to sum 1). Along an axis of length L the blur is a
linear map: an L x L band matrix whose edge columns also collect the weights of the taps that
fall outside (that is the 'nearest' padding). It is applied tile by tile (a block of output
rows needs only the band's columns), so the work is many small matrix products that BLAS runs
near peak speed, instead of one pass over the volume per kernel tap. Slices (and blocks of
rows, for the slice axis) are spread over a thread pool, one BLAS thread each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Output rows per matrix product: larger tiles waste multiplications on the band's zeros,
#: smaller ones run BLAS below its speed.
TILE = 64
#: Rows of each slice per block when blurring along the slice axis (one task of the pool).
SLICE_AXIS_ROWS = 8


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1D Gaussian taps (float64) of standard deviation ``sigma`` voxels, centre in the middle."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def band_matrix(length: int, taps: np.ndarray) -> np.ndarray:
    """The (length, length) float64 matrix of a 1D convolution by symmetric ``taps``, edges repeated."""
    if length == 1:
        return np.full((1, 1), taps.sum())
    radius = len(taps) // 2
    beyond = radius - (length - 1)  # taps this far out read the edge voxel from every row: fold them
    if beyond > 0:
        taps = np.concatenate([[taps[:beyond + 1].sum()], taps[beyond + 1:-beyond - 1], [taps[-beyond - 1:].sum()]])
        radius = length - 1
    rows = np.repeat(np.arange(length), len(taps))
    columns = np.clip(rows + np.tile(np.arange(-radius, radius + 1), length), 0, length - 1)
    matrix = np.zeros((length, length))
    np.add.at(matrix, (rows, columns), np.tile(taps, length))
    return matrix


class AxisBlur:
    """A 1D blur along one axis of length ``length``: its band matrix and its tiles."""

    def __init__(self, length: int, taps: np.ndarray, device: torch.device) -> None:
        self.matrix = torch.from_numpy(band_matrix(length, taps).astype(np.float32)).to(device)
        self.matrix_t = self.matrix.T.contiguous()
        radius = len(taps) // 2
        self.tiles = [(start, min(length, start + TILE), max(0, start - radius), min(length, start + TILE + radius))
                      for start in range(0, length, TILE)]

    def rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst = matrix @ src`` for 2D ``src`` (length, n): blur along the first axis."""
        for start, stop, first, last in self.tiles:
            dst[start:stop].addmm_(self.matrix[start:stop, first:last], src[first:last], beta=0)

    def columns(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """``dst = src @ matrix.T`` for 2D ``src`` (n, length): blur along the second axis."""
        for start, stop, first, last in self.tiles:
            dst[:, start:stop].addmm_(src[:, first:last], self.matrix_t[first:last, start:stop], beta=0)


def _check_sigmas(sigma_voxels: Iterable[float]) -> tuple[float, float, float]:
    sigmas = tuple(float(s) for s in sigma_voxels)
    if len(sigmas) != 3 or not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ValueError(f"sigma_voxels must be three finite numbers >= 0 (slice, row, column), got {sigmas}")
    return sigmas


def _blur_plane(src: torch.Tensor, dst: torch.Tensor, row: AxisBlur | None, column: AxisBlur | None) -> None:
    """Blur one slice (rows, columns) from ``src`` into ``dst`` along its rows, then its columns."""
    if row is None and column is None:
        dst.copy_(src)
    elif column is None:
        row.rows(src, dst)
    elif row is None:
        column.columns(src, dst)
    else:
        between = torch.empty_like(src)
        row.rows(src, between)
        column.columns(between, dst)


def _run(work: Callable[[int], None], items: Iterator[int] | range, threads: int) -> None:
    """``work(item)`` for each item, on ``threads`` threads of one torch (BLAS) thread each.

    One BLAS thread per task: with several, every small product starts a parallel region, which
    is slow, and very slow when other processes compete for the cores.
    """
    if threads <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for done in pool.map(work, items):
            del done  # pool.map re-raises a task's exception here


def gaussian_blur_3d(
    voxels: np.ndarray,
    sigma_voxels: tuple[float, float, float],
    truncate: float = 4.0,
    *,
    device: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """``voxels`` (depth, rows, columns) blurred by a Gaussian of ``sigma_voxels`` per axis, as float32.

    A sigma of 0 leaves that axis alone. ``device``: ``"cuda"`` or ``"cpu"``; default CUDA when
    available. ``threads``: CPU threads (default ``torch.get_num_threads()``). The output has the
    input's shape; matches ``scipy.ndimage.gaussian_filter(..., mode='nearest')`` to float32 rounding.
    """
    if voxels.ndim != 3:
        raise ValueError(f"voxels must be a 3D (depth, rows, columns) array, got shape {voxels.shape}")
    sigmas = _check_sigmas(sigma_voxels)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = max(1, threads or torch.get_num_threads()) if device.type == "cpu" else 1
    array = np.ascontiguousarray(voxels, dtype=np.float32)
    source = torch.from_numpy(array).to(device)
    owned = array is not voxels or device.type != "cpu"  # a copy of ours: reusable as a buffer
    depth, rows, columns = source.shape
    slice_axis, row_axis, column_axis = (
        AxisBlur(length, gaussian_kernel(sigma, truncate), device) if sigma > 0 else None
        for length, sigma in zip(source.shape, sigmas, strict=True))
    with torch.no_grad():
        planes = torch.empty_like(source)
        _run(lambda d: _blur_plane(source[d], planes[d], row_axis, column_axis), range(depth), threads)
        if slice_axis is None:
            return planes.cpu().numpy()
        result = source if owned else torch.empty_like(source)
        flat_in, flat_out = planes.reshape(depth, -1), result.reshape(depth, -1)
        block = SLICE_AXIS_ROWS * columns
        _run(lambda start: slice_axis.rows(flat_in[:, start:start + block], flat_out[:, start:start + block]),
             range(0, rows * columns, block), threads)
        return result.cpu().numpy()
