#!/usr/bin/env bash
# make image-test: build the gateway's image, start the compose stack (redis, inference, worker, orthanc,
# hippoai; then the test-tool service), wait until every service is healthy, check it through its published ports
# (tests/image/check_stack.py) and inside its containers (users, read-only code), then stop and remove
# everything it started, also when a step fails or it is interrupted.
# Docker when a Docker daemon answers; otherwise podman with podman-compose (pinned in requirements-dev.txt),
# local stand-in base images (deploy/images/build-stand-ins.sh) and deploy/images/containers.conf.
# No engine that can run: one line saying why, exit 0 (exit 1 under CI=true). OHIF is not started
# (its image has no Debian stand-in; it only serves Orthanc's DICOMweb to a browser).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
STUDIES=../shared/data/studies
PROJECT=hippoai-image-test-$$
STARTED=$(date +%s)

say() { printf 'image-test: %s\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - STARTED )) s"; }
skip() {
    say "skipped: $1"
    [ "${CI:-}" = true ] && { say "CI=true: a skip is a failure here"; exit 1; }
    exit 0
}

# -- which engine -------------------------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
    COMPOSE=(docker compose -p "$PROJECT")
elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/images/containers.conf}
    command -v runc >/dev/null 2>&1 || skip "podman is installed but runc (deploy/images/containers.conf's runtime) is not"
    command -v mmdebstrap >/dev/null 2>&1 || skip "podman is installed but mmdebstrap (for the stand-in base images) is not"
    podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -n 1)"
    [ -x "$BIN/podman-compose" ] || skip "$BIN/podman-compose missing (make image-test installs the dev requirements)"
    COMPOSE=("$BIN/podman-compose" -p "$PROJECT")
else
    skip "no container engine: no Docker daemon answers and podman is not installed"
fi
[ -d "$STUDIES/Study1" ] || skip "$STUDIES/Study1 missing (the shared data folder beside the repository)"
say "engine: $ENGINE; project $PROJECT"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export INFERENCE_PUBLISH_PORT ORTHANC_DICOM_PORT ORTHANC_HTTP_PORT INFERENCE_DATA_DIR OHIF_PORT
INFERENCE_PUBLISH_PORT=$(free_port); ORTHANC_DICOM_PORT=$(free_port); ORTHANC_HTTP_PORT=$(free_port)
OHIF_PORT=$(free_port)
INFERENCE_DATA_DIR=$(cd "$STUDIES" && pwd)
REFERENCE_PORT=$(free_port)
WORK=$(mktemp -d)
REFERENCE_PID=

container() {  # container() SERVICE: the id of the service's (first) container
    $ENGINE ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" != 0 ]; then
        for service in redis inference worker orthanc hippoai; do
            id=$(container "$service" 2>/dev/null || true)
            [ -n "$id" ] || continue
            say "--- last lines of $service's log ---"
            $ENGINE logs --tail 30 "$id" 2>&1 || true
        done
        [ -f "$WORK/reference.log" ] && { say "--- make serve's log ---"; tail -n 20 "$WORK/reference.log"; }
    fi
    [ -n "$REFERENCE_PID" ] && kill "$REFERENCE_PID" 2>/dev/null && wait "$REFERENCE_PID" 2>/dev/null
    "${COMPOSE[@]}" down -v -t 10 >"$WORK/down.log" 2>&1 || { say "compose down failed:"; cat "$WORK/down.log"; }
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then say "passed in $(elapsed)"; else say "FAILED after $(elapsed)"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- the compose files, statically: both resolve, and the GPU override (no GPU here) is what a GPU site needs
"${COMPOSE[@]}" -f docker-compose.yml config >"$WORK/compose.yml" 2>"$WORK/config.log" \
    || { cat "$WORK/config.log"; exit 1; }
"${COMPOSE[@]}" -f docker-compose.yml -f docker-compose.gpu.yml config >"$WORK/compose-gpu.yml" 2>"$WORK/config.log" \
    || { cat "$WORK/config.log"; exit 1; }
"$PYTHON" tests/image/check_stack.py gpu-config "$WORK/compose-gpu.yml"

# -- build ----------------------------------------------------------------------------------------
if [ "$ENGINE" = docker ]; then
    docker compose -p "$PROJECT" --profile test build inference test-tool
else
    # the stand-in base images, then both images (cached layers), pip through this host's settings
    PYTHON=$PYTHON tests/image/build-podman.sh --test-tool
fi
say "image built ($(elapsed))"

# -- start: Redis and Orthanc first (podman-compose does not wait for service_healthy), then the rest ---
"${COMPOSE[@]}" up -d --no-build redis orthanc >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; exit 1; }

healthy() {  # healthy SERVICE: 0 once its healthcheck passes (podman runs it now; Docker reports its own)
    local id
    id=$(container "$1")
    [ -n "$id" ] || return 1
    if [ "$ENGINE" = podman ]; then
        podman healthcheck run "$id" >/dev/null 2>&1
    else
        [ "$(docker inspect --format '{{.State.Health.Status}}' "$id")" = healthy ]
    fi
}
wait_healthy() {  # wait_healthy SECONDS SERVICE...
    local deadline=$(( $(date +%s) + $1 )) service
    shift
    for service in "$@"; do
        until healthy "$service"; do
            [ "$(date +%s)" -lt "$deadline" ] || { say "$service not healthy after its wait"; exit 1; }
            id=$(container "$service")
            [ "$($ENGINE inspect --format '{{.State.Running}}' "$id")" = true ] \
                || { say "$service exited ($($ENGINE inspect --format '{{.State.ExitCode}}' "$id"))"; exit 1; }
            sleep 2
        done
        say "$service healthy ($(elapsed))"
    done
}
wait_healthy 60 redis
"${COMPOSE[@]}" up -d --no-build inference worker hippoai >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; exit 1; }
# The reference for the volumes, started meanwhile: the gateway as `make serve` runs it, on the host
# (one worker, a free port).
INFERENCE_PORT=$REFERENCE_PORT INFERENCE_WORKERS=1 INFERENCE_OUTPUT_ROOT="$WORK/jobs" \
    "$BIN/gunicorn" -c gunicorn.conf.py >"$WORK/reference.log" 2>&1 &
REFERENCE_PID=$!
wait_healthy 240 inference worker hippoai
# Orthanc has no healthcheck in the compose file (its image has neither curl nor Python): its REST API answers
until "$PYTHON" -c "import requests, sys; requests.get('http://127.0.0.1:$ORTHANC_HTTP_PORT/system', timeout=5).raise_for_status()" 2>/dev/null; do
    [ "$(( $(date +%s) - STARTED ))" -lt 600 ] || { say "orthanc's REST API does not answer"; exit 1; }
    sleep 1
done
say "orthanc answers on its published HTTP port ($(elapsed))"
until INFERENCE_HOST=127.0.0.1 INFERENCE_PORT=$REFERENCE_PORT "$PYTHON" healthcheck.py 2>/dev/null; do
    kill -0 "$REFERENCE_PID" 2>/dev/null || { say "the make-serve reference server exited"; exit 1; }
    sleep 1
done

# -- inside the containers: users, capabilities, read-only code, writable state ----------------------
check_user() {  # check_user SERVICE WRITABLE_FOLDER
    local id uid caps
    id=$(container "$1")
    uid=$($ENGINE exec "$id" id -u)
    [ "$uid" = 10001 ] || { say "$1 runs as uid $uid, not 10001"; exit 1; }
    caps=$($ENGINE exec "$id" sh -c 'grep CapEff /proc/1/status' | awk '{print $2}')
    [ "$caps" = 0000000000000000 ] || { say "$1 has capabilities $caps"; exit 1; }
    if $ENGINE exec "$id" sh -c 'touch /app/gateway.py || touch /app/new-file || touch /app/models/new-file' 2>/dev/null; then
        say "$1 can write its own code under /app"; exit 1
    fi
    $ENGINE exec "$id" sh -c "touch '$2/.image-test' && rm '$2/.image-test'" \
        || { say "$1 cannot write $2"; exit 1; }
    say "ok: $1 runs as uid 10001 with no capabilities; /app read-only, $2 writable"
}
check_user inference /var/lib/inference/jobs
check_user worker /var/lib/inference/jobs
check_user hippoai /var/lib/inference/pacs
say "redis runs as uid $($ENGINE exec "$(container redis)" id -u), orthanc as uid $($ENGINE exec "$(container orthanc)" id -u) (their images' choice)"

# -- the test-tool service (profile test): Study1 from inside the compose network, as uid 10002 ----------
mkdir -m 777 "$WORK/tool-output"
STUDY_DIR=$INFERENCE_DATA_DIR/Study1 TEST_TOOL_OUTPUT=$WORK/tool-output \
    "${COMPOSE[@]}" --profile test run --rm --no-deps test-tool >"$WORK/tool.log" 2>&1 || { cat "$WORK/tool.log"; exit 1; }
grep -q "response checked against the protocol and the study sent: OK" "$WORK/tool.log" \
    || { cat "$WORK/tool.log"; say "the test-tool service did not check the answer"; exit 1; }
[ -s "$WORK/tool-output/index.html" ] || { say "the test-tool service wrote no index.html"; exit 1; }
say "ok: the test-tool service sent Study1 to inference:8900 and checked the answer ($(elapsed))"

# -- through the published ports ----------------------------------------------------------------
"$PYTHON" tests/image/check_stack.py stack --gateway-port "$INFERENCE_PUBLISH_PORT" --reference-port "$REFERENCE_PORT" \
    --orthanc-http-port "$ORTHANC_HTTP_PORT" --orthanc-dicom-port "$ORTHANC_DICOM_PORT" \
    --study "$STUDIES/Study1" --job-in-dir Study1 --worker-logs "$ENGINE logs $(container worker)"
