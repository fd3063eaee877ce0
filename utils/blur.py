"""Separable 3D Gaussian blur of a volume, edge ('nearest') padding, fast on CPU threads or CUDA.

Each axis gets one 1D Gaussian (the kernel ``scipy.ndimage.gaussian_filter`` uses: radius
``int(truncate * sigma + 0.5)``, normalised to sum 1). The convolution is a sum of shifted
copies weighted by the kernel taps, done with torch's vectorised in-place ops on blocks small
enough to stay in the CPU cache; blocks are spread over a thread pool (one torch thread each,
so the pool does not oversubscribe the cores). Indices past an edge read the edge voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Rows per block when blurring along the slice axis (a (depth, ROWS, columns) block is copied
#: contiguous first: strided in-place ops along the slow axis are several times slower).
SLICE_AXIS_ROWS = 2


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1D Gaussian taps (float64) of standard deviation ``sigma`` voxels, centre in the middle."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _check_sigmas(sigma_voxels: Iterable[float]) -> tuple[float, float, float]:
    sigmas = tuple(float(s) for s in sigma_voxels)
    if len(sigmas) != 3 or not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ValueError(f"sigma_voxels must be three finite numbers >= 0 (slice, row, column), got {sigmas}")
    return sigmas


def blur_axis(src: torch.Tensor, dst: torch.Tensor, axis: int, taps: np.ndarray) -> None:
    """``dst`` = ``src`` convolved along ``axis`` with symmetric ``taps``, edges repeated (nearest)."""
    radius = len(taps) // 2
    length = src.shape[axis]
    torch.mul(src, float(taps[radius]), out=dst)
    first, last = src.narrow(axis, 0, 1), src.narrow(axis, length - 1, 1)
    for k in range(1, radius + 1):
        weight = float(taps[radius + k])
        inside = length - k  # positions whose neighbour k steps away is inside the volume
        if inside <= 0:
            dst.add_(first, alpha=weight).add_(last, alpha=weight)
            continue
        dst.narrow(axis, 0, inside).add_(src.narrow(axis, k, inside), alpha=weight)  # voxel i + k
        dst.narrow(axis, inside, k).add_(last, alpha=weight)
        dst.narrow(axis, k, inside).add_(src.narrow(axis, 0, inside), alpha=weight)  # voxel i - k
        dst.narrow(axis, 0, k).add_(first, alpha=weight)


def _blur_in_plane(src: torch.Tensor, dst: torch.Tensor, taps: tuple[np.ndarray | None, ...]) -> None:
    """Blur 2D or 3D blocks along their last two axes (rows, then columns) from ``src`` into ``dst``."""
    row_axis, column_axis = src.dim() - 2, src.dim() - 1
    row_taps, column_taps = taps[1], taps[2]
    if row_taps is None and column_taps is None:
        dst.copy_(src)
    elif row_taps is None or column_taps is None:
        blur_axis(src, dst, column_axis if row_taps is None else row_axis,
                  column_taps if row_taps is None else row_taps)
    else:
        between = torch.empty_like(src)
        blur_axis(src, between, row_axis, row_taps)
        blur_axis(between, dst, column_axis, column_taps)


def _blur_slice_axis_block(volume: torch.Tensor, start: int, stop: int, taps: np.ndarray) -> None:
    """Blur ``volume[:, start:stop]`` along the slice axis in place, through contiguous copies."""
    block = volume[:, start:stop].contiguous()
    blurred = torch.empty_like(block)
    blur_axis(block, blurred, 0, taps)
    volume[:, start:stop].copy_(blurred)


def _run_blocks(work: Callable[[int], None], starts: Iterable[int], threads: int) -> None:
    """Call ``work(start)`` for each block start, on ``threads`` threads of one torch thread each."""
    starts = list(starts)
    if threads <= 1:
        for start in starts:
            work(start)
        return
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for done in pool.map(work, starts):
            del done  # pool.map re-raises a block's exception here


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
    taps = tuple(gaussian_kernel(s, truncate) if s > 0 else None for s in sigmas)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))
    with torch.no_grad():
        if device != "cpu":
            return _blur_on_device(source.to(device), taps).cpu().numpy()
        out = torch.empty_like(source)
        threads = max(1, threads or torch.get_num_threads())
        _run_blocks(lambda d: _blur_in_plane(source[d], out[d], taps), range(source.shape[0]), threads)
        if taps[0] is not None:
            rows = source.shape[1]
            _run_blocks(lambda r: _blur_slice_axis_block(out, r, min(r + SLICE_AXIS_ROWS, rows), taps[0]),
                        range(0, rows, SLICE_AXIS_ROWS), threads)
        return out.numpy()


def _blur_on_device(volume: torch.Tensor, taps: tuple[np.ndarray | None, ...]) -> torch.Tensor:
    """The whole volume at once (a GPU needs no blocking); axis by axis between two buffers."""
    spare = torch.empty_like(volume)
    for axis, axis_taps in enumerate(taps):
        if axis_taps is not None:
            blur_axis(volume, spare, axis, axis_taps)
            volume, spare = spare, volume
    return volume
