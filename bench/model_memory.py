"""Peak memory of a model run against series size, per hippocampus version (issue 35).

    python -m bench.model_memory                                  # one JSON line
    python -m bench.model_memory --shapes 64x64x22,256x256x22 --versions 1.0,1.1 --runs 3

Each (version, shape) runs in a fresh process: the version is loaded as the server loads it, warmed on a
small volume, then the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) is
read around one ``member_probabilities`` on a random volume of ``shape`` (model orientation: 512x512x22 is
the issue's axial series). ``rss_mb`` is that peak above the resident size before the run (median of
``runs``); ``estimate_mb`` is ``HippocampusSegmenter.peak_bytes`` for the shape, what the server checks
against INFERENCE_MODEL_MEMORY_BYTES before it reads a series; ``bytes_per_voxel`` is ``rss_mb`` per voxel.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference.config import PROJECT_ROOT, get_settings

FAMILY = "hippocampus"
SHAPES = ("64x64x22", "128x128x22", "256x256x22")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(version_name: str, shape: tuple[int, ...]) -> dict:
    """In this process: load ``version_name``, warm it, and measure one run on ``shape``."""
    from functools import partial

    from handlers.hippocampus.handler import load_version
    from models.registry import registry_for

    settings = get_settings()
    registry = registry_for(settings.model_manifest)
    version = registry.family(FAMILY).resolve(version_name)
    segmenter = registry.model(version, partial(load_version, onnx_cache=settings.model_cache))
    segmenter.member_probabilities(np.zeros((40, 56, 40), np.float32) + 100)  # sessions made, pool started
    volume = np.random.default_rng(0).normal(300, 60, shape).astype(np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    segmenter.member_probabilities(volume)
    peak = _status_kib("VmHWM")
    return {"rss_bytes": (peak - before) * 1024, "estimate_bytes": segmenter.peak_bytes(shape),
            "voxels": math.prod(shape)}


def run_child(version: str, shape: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.model_memory", "--child", version, shape], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="model-orientation shapes, e.g. 256x256x22")
    ap.add_argument("--versions", default=None, help="comma-separated versions (default: all)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("VERSION", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        figures = measure(args.child[0], tuple(int(n) for n in args.child[1].split("x")))
        print(json.dumps(figures))
        return figures
    from models.registry import registry_for

    names = args.versions.split(",") if args.versions else list(
        registry_for(get_settings().model_manifest).family(FAMILY).versions)
    table: dict = {}
    for shape in args.shapes.split(","):
        for name in names:  # versions take turns at each shape
            runs = [run_child(name, shape) for _ in range(args.runs)]
            rss = statistics.median(r["rss_bytes"] for r in runs)
            table.setdefault(name, {})[shape] = {
                "rss_mb": round(rss / 2**20, 1), "rss_mb_range": [round(min(r["rss_bytes"] for r in runs) / 2**20, 1),
                                                                 round(max(r["rss_bytes"] for r in runs) / 2**20, 1)],
                "estimate_mb": round(runs[0]["estimate_bytes"] / 2**20, 1),
                "bytes_per_voxel": round(rss / runs[0]["voxels"]), "runs": len(runs)}
    result = {"peak_rss_above_loaded_model": table}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
