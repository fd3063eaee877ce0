"""Model time and FLOPs of every hippocampus version on Study1's crop, in-process (issue 28).

    python -m bench.model_versions              # one JSON line
    python -m bench.model_versions --repeats 9

Each version runs the one pipeline exactly as a request naming it (``model_version``) would; its time
is the handler's own ``inference_seconds`` (reorientation + model on the crop), median over
``repeats``, the versions taking turns in every round so all see the same machine load. GFLOP are
counted by ``torch.utils.flop_counter`` (a multiply-add = 2 FLOPs) around one pass of the version's
networks, run by PyTorch with the version's inference settings, on a volume of the crop's shape.
``hippocampus_default_to_fast`` is the default version's time over ``1.0-fast``'s (issue 28: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence

import numpy as np

from inference.config import PROJECT_ROOT, get_settings

STUDY1 = PROJECT_ROOT.parent / "shared" / "data" / "studies" / "Study1"
COMMAND = "get-hippocampus-volume"
FAMILY = "hippocampus"
FAST_VERSION = "1.0-fast"


def version_gflop(shape: tuple[int, int, int]) -> dict[str, float]:
    """GFLOP of one run of every version of the family on a volume of ``shape`` (model orientation)."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import registry_for
    from models.segmenter import HippocampusSegmenter, version_settings

    volume = np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)
    out = {}
    for name, version in registry_for(get_settings().model_manifest).family(FAMILY).versions.items():
        segmenter = HippocampusSegmenter.load(version.weights, device="cpu", backend="torch",
                                              **version_settings(version.inference))
        with FlopCounterMode(display=False) as counter:
            segmenter.probabilities(volume)
        out[name] = round(counter.get_total_flops() / 1e9, 2)
    return out


def measure_versions(repeats: int = 5) -> dict:
    """``hippocampus_version_model_s`` (median seconds per version), GFLOP per version and the default/fast ratio."""
    if not STUDY1.is_dir():
        return {"hippocampus_versions_skipped": "needs ../shared/data/studies/Study1 (absent on this machine)"}
    from handlers import load_handlers
    from inference.dicom.files import dicom_files_in
    from inference.pipeline.pipeline import Pipeline
    from models.registry import registry_for

    settings = get_settings()
    family = registry_for(settings.model_manifest).family(FAMILY)
    load_handlers()
    pipeline = Pipeline(settings, commands=[COMMAND])
    failed = pipeline.warm_up().failed
    if failed:
        return {"hippocampus_versions_skipped": f"the model cannot be loaded: {failed[COMMAND]}"}
    files = dicom_files_in(STUDY1)
    requests = {name: {"inference_command": COMMAND, "model_version": name} for name in family.versions}
    times: dict[str, list[float]] = {name: [] for name in requests}
    shape = None
    for request in requests.values():  # warm-up, not counted
        shape = pipeline.run_files(request, files).response_json["parts"][0]["binary_data_shape"]
    for _ in range(repeats):
        for name, request in requests.items():
            result = pipeline.run_files(request, files)
            times[name].append(next(iter(result.response_json["series_ml_json"].values()))["inference_seconds"])
    medians = {name: round(statistics.median(t), 4) for name, t in times.items()}
    out: dict = {"hippocampus_version_model_s": medians,
                 "hippocampus_version_model_range_s": {name: [round(min(t), 4), round(max(t), 4)]
                                                       for name, t in times.items()},
                 "hippocampus_default_version": family.default_version}
    if shape is not None:  # the DICOM series' (depth, height, width) is the model's (x, y, z) reversed
        out["hippocampus_version_gflop"] = version_gflop((shape["width"], shape["height"], shape["depth"]))
    if FAST_VERSION in medians:
        out["hippocampus_default_to_fast"] = round(medians[family.default_version] / medians[FAST_VERSION], 3)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model_versions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per version (default %(default)s)")
    print(json.dumps(measure_versions(parser.parse_args(argv).repeats)))


if __name__ == "__main__":
    main()
