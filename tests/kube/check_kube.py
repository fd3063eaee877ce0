"""The Python half of `make kube-test` (tests/kube/run.sh): render the chart's podman profile, and check the
played pods with Study1.

``render``: the chart (deploy/helm/inference-gateway) with ``ci/podman-values.yaml`` and run.sh's ports,
image and Secret name, through helm-python-sdk, as one YAML stream for ``podman kube play``; also prints the
broker URL the Secret must hold. ``study``: Study1 sent to the node with dcmtk's ``storescu`` comes back as
results in the job outputs (the job's /query answer, its files, the volumes in response.json) and the
queues drain. Each check prints one "ok:" line or stops with a message saying which and why. Not
collected by pytest (run.sh plays the pods first).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHART = PROJECT_ROOT / "deploy" / "helm" / "inference-gateway"
COMMAND = "get-hippocampus-volume"


class CheckFailed(Exception):
    """A check of the played pods did not hold; the message says which and why."""


def ok(message: str) -> None:
    print(f"kube-test: ok: {message}", flush=True)


def profile_values(args: argparse.Namespace) -> dict:
    """ci/podman-values.yaml with this run's image, ports and Secret (chosen by run.sh)."""
    values = yaml.safe_load((CHART / "ci" / "podman-values.yaml").read_text(encoding="utf-8"))
    repository, _, tag = args.image.rpartition(":")
    values["image"] = {"repository": repository, "tag": tag, "pullPolicy": "Never"}
    values["gateway"]["port"] = args.gateway_port
    values["dicomNode"]["port"] = args.dicom_port
    redis = values.setdefault("redis", {})
    redis["port"] = args.redis_port
    redis["image"] = {"repository": "docker.io/library/redis", "tag": "7.2-alpine", "pullPolicy": "Never"}
    redis["auth"] = {"existingSecret": args.secret, "key": "password", "podmanUrlKey": "url"}
    return values


def render(args: argparse.Namespace) -> None:
    """Write the podman profile to args.output; print the broker URL (pod name of Redis) for the Secret."""
    import helm_python  # a dev requirement: imported here so `study` runs without it

    helm_python.disable_logging()
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(profile_values(args), name=args.release, namespace="default", is_install=True)
    documents = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    # podman plays what it knows and skips the rest silently; leave out what it cannot run, to say so here
    played = [doc for doc in documents if doc["kind"] in ("Deployment", "ConfigMap", "PersistentVolumeClaim")]
    skipped = sorted({doc["kind"] for doc in documents} - {doc["kind"] for doc in played})
    # ConfigMaps first: podman looks them up when it creates a pod's containers
    played.sort(key=lambda doc: {"ConfigMap": 0, "PersistentVolumeClaim": 1}.get(doc["kind"], 2))
    args.output.write_text(yaml.safe_dump_all(played, sort_keys=False), encoding="utf-8")
    redis_pod = next(doc["metadata"]["name"] for doc in played
                     if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-redis")) + "-pod-0"
    print(f"redis://:{{password}}@{redis_pod}:{args.redis_port}/0")
    print(f"kube-test: rendered {len(played)} objects ({', '.join(sorted({d['kind'] for d in played}))}); "
          f"not played by podman: {', '.join(skipped) or 'nothing'}", file=sys.stderr, flush=True)


def redis_lists(job_queues: str) -> list[str]:
    """The Redis lists celery's queues use for INFERENCE_JOB_QUEUES, priority lists included.

    The queue names are those the code declares (celery_config's task_queues); kombu's Redis transport keeps
    queue Q in the list Q and messages of priority step s > 0 in Q + sep + s (its Channel.sep, priority_steps).
    """
    import dataclasses

    from kombu.transport.redis import Channel

    from inference.config import Settings
    from inference.jobs.celery_backend import celery_config

    config = celery_config(dataclasses.replace(Settings(), job_queues=job_queues))
    names = sorted({queue.name for queue in config["task_queues"]})
    return [f"{name}{Channel.sep}{step}" if step else name for name in names for step in Channel.priority_steps]


def job_counts(gateway: str) -> dict[str, float]:
    """inference_jobs by state and the queue depth, from the gateway's /metrics."""
    text = requests.get(f"{gateway}/metrics", timeout=10).text
    counts = {match[1]: float(match[2]) for match in re.finditer(r'^inference_jobs\{state="(\w+)"\} (\S+)$', text, re.M)
              if match[1]}
    depth = re.search(r"^inference_job_queue_depth (\S+)$", text, re.M)
    counts["queue_depth"] = float(depth[1]) if depth else float("nan")
    return counts


def check_study(args: argparse.Namespace) -> None:
    """Study1 by storescu to the node; its job runs on the worker; results in the job outputs; queues drain."""
    gateway = f"http://127.0.0.1:{args.gateway_port}"
    answer = requests.get(f"{gateway}/healthcheck", timeout=10)
    if answer.text != "READY":
        raise CheckFailed(f"gateway /healthcheck answered {answer.status_code} {answer.text[:100]!r}")
    files = sorted(path for path in args.study.rglob("*") if path.is_file())
    started = time.monotonic()
    sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", args.ae_title, "+sd", "+r", "-nh",
                           "127.0.0.1", str(args.dicom_port), str(args.study)], capture_output=True, text=True,
                          timeout=300)
    if sent.returncode != 0:
        raise CheckFailed(f"storescu exited {sent.returncode}: {sent.stderr[-2000:]}")
    ok(f"storescu sent {len(files)} files of {args.study.name} to {args.ae_title} "
       f"in {time.monotonic() - started:.1f} s")
    deadline = time.monotonic() + args.timeout
    uid = None
    while True:
        log = subprocess.run(["podman", "logs", args.node_container], capture_output=True, text=True, timeout=30)
        text = log.stdout + log.stderr
        queued = re.search(r"job (\S+) queued \(" + re.escape(COMMAND), text)
        uid = queued[1] if queued else None
        if uid and re.search(rf"job {re.escape(uid)} completed", text):
            break
        if time.monotonic() > deadline:
            raise CheckFailed(f"after {args.timeout} s: job {'queued as ' + uid if uid else 'not queued'}, not "
                              f"completed; the node's log ends:\n{text[-3000:]}")
        time.sleep(1)
    elapsed = time.monotonic() - started
    query = requests.get(f"{gateway}/query/{uid}", timeout=10)
    if query.status_code != 200:
        raise CheckFailed(f"job {uid}: GET /query answered {query.status_code} {query.text[:300]}")
    names = [entry["name"] for entry in requests.get(f"{gateway}/job/{uid}/files", timeout=10).json()["files"]]
    response = requests.get(f"{gateway}/job/{uid}/files/response.json", timeout=10)
    response.raise_for_status()
    volumes = [values.get("total_volume_mm3") for values in response.json()["series_ml_json"].values()]
    if not any(volumes):
        raise CheckFailed(f"job {uid}: response.json holds no hippocampus volumes: {response.text[:500]}")
    worker = subprocess.run(["podman", "logs", args.worker_container], capture_output=True, text=True, timeout=30)
    if uid not in worker.stdout + worker.stderr:
        raise CheckFailed(f"job {uid} completed, but the worker's log does not mention it")
    ok(f"job {uid} ({COMMAND}) from the node ran on the worker: {len(names)} files in the job outputs, "
       f"volumes {volumes} mm3, {elapsed:.1f} s after storescu began")
    while (counts := job_counts(gateway)).get("queued", 1) or counts.get("running", 1) or counts["queue_depth"]:
        if time.monotonic() > deadline:
            raise CheckFailed(f"the queue did not drain: {counts}")
        time.sleep(1)
    script = ("local n = 0 for _, k in ipairs(ARGV) do n = n + redis.call('llen', k) end "
              "return n + redis.call('hlen', 'unacked')")
    lists = subprocess.run(["podman", "exec", args.redis_container, "redis-cli", "-e", "-p", str(args.redis_port),
                            "eval", script, "0", *args.lists], capture_output=True, text=True, timeout=30)
    if lists.returncode != 0 or lists.stdout.strip() != "0":
        raise CheckFailed(f"Redis lists {args.lists} and the unacked hash hold {lists.stdout.strip()} "
                          f"{lists.stderr.strip()}")
    ok(f"queue drained: /metrics {json.dumps(counts)}; Redis lists {', '.join(map(repr, args.lists))} and "
       "celery's unacked hash empty")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    profile = commands.add_parser("render", help="render the podman profile")
    profile.add_argument("--release", required=True)
    profile.add_argument("--image", required=True, help="the gateway's image, REPOSITORY:TAG")
    profile.add_argument("--secret", required=True, help="name of the podman secret with password and url")
    profile.add_argument("--output", type=Path, required=True)
    for port in ("--gateway-port", "--dicom-port", "--redis-port"):
        profile.add_argument(port, type=int, required=True)
    lists = commands.add_parser("lists", help="print the Redis lists of the rendered profile's queues, one a line")
    lists.add_argument("kube", type=Path, help="the rendered profile (its settings ConfigMap's INFERENCE_JOB_QUEUES)")
    study = commands.add_parser("study", help="Study1 through the node, the worker and back into the job outputs")
    study.add_argument("--gateway-port", type=int, required=True)
    study.add_argument("--dicom-port", type=int, required=True)
    study.add_argument("--redis-port", type=int, required=True)
    study.add_argument("--ae-title", default="HIPPOAI")
    study.add_argument("--study", type=Path, required=True)
    study.add_argument("--node-container", required=True)
    study.add_argument("--worker-container", required=True)
    study.add_argument("--redis-container", required=True)
    study.add_argument("--lists", nargs="+", required=True, help="the queues' Redis lists (priority lists too)")
    study.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            render(args)
        elif args.command == "lists":
            settings = next(doc["data"] for doc in yaml.safe_load_all(args.kube.read_text(encoding="utf-8"))
                            if doc["kind"] == "ConfigMap" and "INFERENCE_JOB_QUEUES" in doc.get("data", {}))
            print(*redis_lists(settings["INFERENCE_JOB_QUEUES"]), sep="\n")
        else:
            check_study(args)
    except (CheckFailed, requests.RequestException) as error:
        print(f"kube-test: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
