"""Benchmark of the 3D Gaussian blur (``inference.imaging.blur``) against ``scipy.ndimage.gaussian_filter``.

    python -m bench.blur                # one JSON line: seconds of both, their ratio, the max difference
    python -m bench.blur --repeats 5

Both blur the same random 256 x 512 x 512 float32 volume with the same per-axis sigma and
'nearest' edges, alternately in one run (so both see the same machine load); each time is
the median of ``repeats`` runs. The target is ``ratio`` (ours / scipy) <= 0.5 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from inference.imaging.blur import gaussian_blur_3d

SHAPE = (256, 512, 512)
#: 2 mm sigma on 2 mm slices of 1 mm pixels: the anisotropic case the handler meets.
SIGMA_VOXELS = (1.0, 2.0, 2.0)
TRUNCATE = 4.0


def _timed(blur: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = blur()
    return time.perf_counter() - started, result


def measure_blur(repeats: int = 3, shape: Sequence[int] = SHAPE,
                 sigma_voxels: Sequence[float] = SIGMA_VOXELS) -> dict:
    """Median seconds of our blur and scipy's on one random volume, their ratio and largest difference."""
    volume = np.random.default_rng(0).random(tuple(shape), dtype=np.float32)
    sigmas = tuple(float(s) for s in sigma_voxels)
    ours_times, scipy_times = [], []
    max_difference = 0.0
    for _ in range(max(1, repeats)):
        seconds, ours = _timed(lambda: gaussian_blur_3d(volume, sigmas, TRUNCATE, device="cpu"))
        ours_times.append(seconds)
        seconds, reference = _timed(lambda: ndimage.gaussian_filter(volume, sigmas, mode="nearest",
                                                                    truncate=TRUNCATE))
        scipy_times.append(seconds)
        max_difference = max(max_difference, float(np.abs(ours - reference).max()))
        del ours, reference
    ours_s, scipy_s = statistics.median(ours_times), statistics.median(scipy_times)
    return {
        "shape": list(shape),
        "sigma_voxels": list(sigmas),
        "repeats": len(ours_times),
        "threads": torch.get_num_threads(),
        "ours_s": round(ours_s, 3),
        "scipy_s": round(scipy_s, 3),
        "ratio": round(ours_s / scipy_s, 3),
        "max_abs_difference": max_difference,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blur", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each blur; the median counts (default 3)")
    args = parser.parse_args(argv)
    print(json.dumps(measure_blur(args.repeats)))


if __name__ == "__main__":
    main()
