"""The checks `make image-test` runs: the GPU override as compose resolves it (``gpu-config``), and the
started compose stack through its published ports (``stack``).

Run by tests/image/run.sh; each check prints one "ok:" line with what it measured, or stops with a
message naming the check and why. Not collected by pytest (run.sh starts the stack, not the suite).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from pydicom import dcmread
from pynetdicom import AE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOOL = PROJECT_ROOT / "inference-test-tool" / "send-inference-request.sh"
COMMAND = "get-hippocampus-volume"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class CheckFailed(Exception):
    """A check of the stack did not hold; the message says which and why."""


def ok(message: str) -> None:
    print(f"image-test: ok: {message}", flush=True)


GPU_SERVICES = ("inference", "worker", "hippoai")


def build_arg(args: dict | list | None, name: str) -> str | None:
    """A build argument as compose resolved it: a mapping (Docker) or ``NAME=value`` items, last one winning."""
    if isinstance(args, dict):
        return args.get(name)
    values = [item.partition("=")[2] for item in args or [] if item.partition("=")[0] == name]
    return values[-1] if values else None


def check_gpu_config(resolved: Path) -> None:
    """docker-compose.yml with docker-compose.gpu.yml, resolved by ``compose config``: every service that
    runs the models uses the CUDA image and reserves an NVIDIA GPU; those that build it build CUDA torch."""
    services = yaml.safe_load(resolved.read_text(encoding="utf-8"))["services"]
    for name in GPU_SERVICES:
        service = services[name]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if not any(device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []) for device in devices):
            raise CheckFailed(f"GPU override: {name} reserves no NVIDIA GPU: {devices}")
        if not service["image"].endswith(":cuda"):
            raise CheckFailed(f"GPU override: {name} runs {service['image']}, not the CUDA image")
        if "build" in service and not str(build_arg(service["build"].get("args"), "TORCH_VARIANT")).startswith("cu"):
            raise CheckFailed(f"GPU override: {name} builds with TORCH_VARIANT "
                              f"{build_arg(service['build'].get('args'), 'TORCH_VARIANT')}, not a CUDA index")
    ok(f"GPU override (compose config): {', '.join(GPU_SERVICES)} run hippocampus-inference:cuda with an NVIDIA GPU")


def check_healthcheck_and_models(gateway: str) -> None:
    """The gateway answers READY and lists the hippocampus command in GET /models."""
    answer = requests.get(f"{gateway}/healthcheck", timeout=10)
    if answer.status_code != 200 or answer.text != "READY":
        raise CheckFailed(f"GET /healthcheck: {answer.status_code} {answer.text[:200]!r}, expected 200 READY")
    models = requests.get(f"{gateway}/models", timeout=10)
    models.raise_for_status()
    commands = {model["inference_command"] for model in models.json()["models"]}
    if COMMAND not in commands:
        raise CheckFailed(f"GET /models does not list {COMMAND}: {sorted(commands)}")
    ok(f"GET /healthcheck READY; GET /models lists {len(commands)} commands, {COMMAND} among them")


def tool_volumes(port: int, study: Path, output: Path) -> dict:
    """Study1 through the test tool against the server on ``port``: its series_ml_json without timings."""
    started = time.monotonic()
    run = subprocess.run([str(TOOL), "-i", str(study), "--port", str(port), "-o", str(output), "-c", COMMAND],
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise CheckFailed(f"test tool against port {port} exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    response = json.loads((output / "response.json").read_text(encoding="utf-8"))
    results = {uid: {key: value for key, value in values.items() if key != "inference_seconds"}
               for uid, values in response["series_ml_json"].items()}
    if not any("total_volume_mm3" in values for values in results.values()):
        raise CheckFailed(f"the test tool's answer from port {port} holds no volumes: {results}")
    print(f"image-test: test tool on port {port}: {time.monotonic() - started:.1f} s round trip", flush=True)
    return {"series": results, "model": response["model"]}


def check_test_tool(container_port: int, reference_port: int, study: Path) -> None:
    """Study1 through inference-test-tool/send-inference-request.sh gives the container the same
    volumes and model as the make-serve server on the host."""
    with tempfile.TemporaryDirectory() as folder:
        container = tool_volumes(container_port, study, Path(folder) / "container")
        reference = tool_volumes(reference_port, study, Path(folder) / "make-serve")
    if container != reference:
        raise CheckFailed(f"volumes differ: container {container} != make serve {reference}")
    totals = [values.get("total_volume_mm3") for values in container["series"].values()]
    ok(f"Study1 through the test tool: volumes equal to make serve's (total {totals} mm3)")


def check_job(gateway: str, worker_logs: list[str], in_dir: str) -> None:
    """A job through the API: queued in Redis, run by a worker container, its files served by the API."""
    started = time.monotonic()
    answer = requests.post(f"{gateway}/job/", json={"job_name": COMMAND, "in_dir": in_dir}, timeout=30)
    if answer.status_code not in (200, 201, 202):
        raise CheckFailed(f"POST /job/: {answer.status_code} {answer.text[:300]}")
    uid = answer.json()["uid"]
    deadline = time.monotonic() + 180
    while (query := requests.get(f"{gateway}/query/{uid}", timeout=10)).status_code == 202:
        if time.monotonic() > deadline:
            raise CheckFailed(f"job {uid} still {query.json().get('msg')!r} after 180 s")
        time.sleep(0.5)
    if query.status_code != 200:
        raise CheckFailed(f"job {uid}: GET /query answered {query.status_code} {query.text[:300]}")
    elapsed = time.monotonic() - started
    files = requests.get(f"{gateway}/job/{uid}/files", timeout=10)
    files.raise_for_status()
    names = [entry["name"] for entry in files.json()["files"]]
    if "response.json" not in names:
        raise CheckFailed(f"job {uid} completed without a response.json: {names}")
    logs = subprocess.run(worker_logs, capture_output=True, text=True, timeout=30)
    if uid not in logs.stdout + logs.stderr:
        raise CheckFailed(f"job {uid} completed, but the worker container's log does not mention it")
    ok(f"job {uid} through the API and the worker: completed in {elapsed:.1f} s, {len(names)} files served")


def orthanc_study_series(orthanc: str, study_uid: str) -> list[dict]:
    """The series Orthanc holds in the study with this StudyInstanceUID (none yet: empty)."""
    found = requests.post(f"{orthanc}/tools/find", timeout=10,
                          json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
    if not found:
        return []
    return requests.get(f"{orthanc}/studies/{found[0]}/series", timeout=10).json()


def check_pacs_loop(orthanc: str, dicom_port: int, study: Path) -> None:
    """Study1 C-STOREd into Orthanc comes back, in the same study, with a SEG, an SR and a Secondary
    Capture sent by the hippoai service (Orthanc's autoroute.lua routes it there)."""
    files = sorted(path for path in study.rglob("*") if path.is_file())
    datasets = [dcmread(path) for path in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    ae = AE(ae_title="IMAGETEST")
    for sop_class, syntax in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    started = time.monotonic()
    association = ae.associate("127.0.0.1", dicom_port, ae_title="ORTHANC")
    if not association.is_established:
        raise CheckFailed(f"Orthanc on port {dicom_port} refused the association")
    try:
        refused = [path.name for path, ds in zip(files, datasets, strict=True)
                   if getattr(association.send_c_store(ds), "Status", None) != 0]
    finally:
        association.release()
    if refused:
        raise CheckFailed(f"Orthanc did not store {len(refused)} instances: {refused[:5]}")
    print(f"image-test: {len(files)} instances C-STOREd into Orthanc", flush=True)
    deadline = time.monotonic() + 180
    while True:
        series = orthanc_study_series(orthanc, study_uid)
        modalities = {one["MainDicomTags"].get("Modality") for one in series}
        classes = set()
        for one in series:
            instance = one["Instances"][0]
            tags = requests.get(f"{orthanc}/instances/{instance}/simplified-tags", timeout=10).json()
            classes.add(tags.get("SOPClassUID"))
        if {"SEG", "SR"} <= modalities and SECONDARY_CAPTURE in classes:
            break
        if time.monotonic() > deadline:
            raise CheckFailed(f"after 180 s the study in Orthanc holds modalities {sorted(map(str, modalities))} "
                              f"and classes {sorted(map(str, classes))}: no SEG, SR and Secondary Capture from hippoai")
        time.sleep(1)
    ok(f"PACS loop: Study1 into Orthanc, SEG + SR + Secondary Capture back in the same study "
       f"{time.monotonic() - started:.1f} s after the C-STORE began")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gpu = commands.add_parser("gpu-config", help="check the resolved GPU compose configuration")
    gpu.add_argument("resolved", type=Path,
                     help="output of compose -f docker-compose.yml -f docker-compose.gpu.yml config")
    stack = commands.add_parser("stack", help="check the running stack through its published ports")
    stack.add_argument("--gateway-port", type=int, required=True, help="published port of the inference service")
    stack.add_argument("--reference-port", type=int, required=True, help="port of the make-serve server on the host")
    stack.add_argument("--orthanc-http-port", type=int, required=True)
    stack.add_argument("--orthanc-dicom-port", type=int, required=True)
    stack.add_argument("--study", type=Path, required=True, help="Study1's folder on the host")
    stack.add_argument("--job-in-dir", required=True, help="the study's folder under the data root")
    stack.add_argument("--worker-logs", required=True, help="command printing the worker's log (split on spaces)")
    args = parser.parse_args(argv)
    try:
        if args.command == "gpu-config":
            check_gpu_config(args.resolved)
            return 0
        gateway = f"http://127.0.0.1:{args.gateway_port}"
        check_healthcheck_and_models(gateway)
        check_test_tool(args.gateway_port, args.reference_port, args.study)
        check_job(gateway, args.worker_logs.split(), args.job_in_dir)
        check_pacs_loop(f"http://127.0.0.1:{args.orthanc_http_port}", args.orthanc_dicom_port, args.study)
    except (CheckFailed, requests.RequestException) as error:
        print(f"image-test: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
