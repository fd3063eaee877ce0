#!/usr/bin/env bash
# make kube-test: the Helm chart's podman profile (deploy/helm/inference-gateway with ci/podman-values.yaml,
# rendered by tests/kube/check_kube.py through helm-python-sdk) played with `podman kube play`: Redis, the
# gateway, a worker and the DICOM node come up healthy; Study1 sent to the node with dcmtk's storescu comes
# back as results in the job outputs; the queue drains; `podman kube down` leaves no pod or container, and
# what the run made besides (the PVCs' volumes, the Secret, the network) is removed and checked gone.
# The image is built once and reused (tests/image/build-podman.sh: cached layers; `make image-test` before
# it in .ci/run leaves it built). Nothing it cannot run here: one line saying why, exit 0 (exit 1 under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
STUDY=../shared/data/studies/Study1
RUN=kt$$
RELEASE=$RUN
STARTED=$(date +%s)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/images/containers.conf}

say() { printf 'kube-test: %s\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - STARTED )) s"; }
skip() {
    say "skipped: $1"
    [ "${CI:-}" = true ] && { say "CI=true: a skip is a failure here"; exit 1; }
    exit 0
}

command -v podman >/dev/null 2>&1 || skip "podman is not installed"
command -v runc >/dev/null 2>&1 || skip "runc (deploy/images/containers.conf's runtime) is not installed"
command -v catatonit >/dev/null 2>&1 || skip "catatonit (the pause process of podman's pods) is not installed"
command -v mmdebstrap >/dev/null 2>&1 || skip "mmdebstrap (for the stand-in base images) is not installed"
command -v storescu >/dev/null 2>&1 || skip "dcmtk's storescu is not installed"
podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -n 1)"
[ -d "$STUDY" ] || skip "$STUDY missing (the shared data folder beside the repository)"
"$PYTHON" -c "import helm_python" 2>/dev/null || skip "helm-python-sdk missing ($PYTHON; make kube-test installs the dev requirements)"

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GATEWAY_PORT=$(free_port); DICOM_PORT=$(free_port); REDIS_PORT=$(free_port)
WORK=$(mktemp -d)
KUBE=$WORK/kube.yaml
NETWORK=$RUN-net
SECRET=$RUN-redis
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/inference-gateway/Chart.yaml)
IMAGE=localhost/hippocampus-inference:$APP_VERSION
played=0

container() { echo "$RELEASE-inference-gateway-$1-pod-0-$2"; }  # container COMPONENT CONTAINER: podman's name
leftovers() {  # what of this run is still there, one line each
    podman pod ps --format '{{.Name}}' | grep "^$RELEASE-" | sed 's/^/pod /' || true
    podman ps -a --format '{{.Names}}' | grep "^$RELEASE-" | sed 's/^/container /' || true
    podman volume ls --format '{{.Name}}' | grep "^$RELEASE-" | sed 's/^/volume /' || true
    podman secret ls --format '{{.Name}}' | grep -x "$SECRET" | sed 's/^/secret /' || true
    podman network ls --format '{{.Name}}' | grep -x "$NETWORK" | sed 's/^/network /' || true
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" != 0 ] && [ "$played" = 1 ]; then
        for part in redis:redis gateway:gateway worker:worker dicom-node:dicom-node; do
            say "--- last lines of ${part%%:*}'s log ---"
            podman logs --tail 30 "$(container "${part%%:*}" "${part#*:}")" 2>&1 || true
        done
    fi
    if [ "$played" = 1 ]; then
        podman kube down "$KUBE" >"$WORK/down.log" 2>&1 || { say "podman kube down failed:"; cat "$WORK/down.log"; status=1; }
        # kube down removes the pods and their containers; what it leaves here is a failure
        left=$(leftovers | grep -E '^(pod|container) ' || true)
        [ -z "$left" ] || { say "podman kube down left: $left"; status=1; }
        # the claims' and ConfigMaps' volumes (podman 4.3's kube down keeps named volumes; a cluster keeps
        # PVCs too), the Secret and the
        # network were made for this run: removed here
        volumes=$(leftovers | awk '$1 == "volume" {print $2}')
        [ -z "$volumes" ] || { say "removing the volumes podman kube down keeps (claims and ConfigMaps): $(echo $volumes)"; podman volume rm -f $volumes >/dev/null; }
    fi
    podman secret rm "$SECRET" >/dev/null 2>&1 || true
    podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
    left=$(leftovers)
    [ -z "$left" ] || { say "left behind: $left"; status=1; }
    [ "$played" = 1 ] && [ "$status" = 0 ] && say "ok: podman kube down and the clean-up left no pod, container, volume, secret or network"
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then say "passed in $(elapsed)"; else say "FAILED after $(elapsed)"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- the image: built once (cached layers), tagged with the chart's appVersion (the chart names no `latest`) --
PYTHON=$PYTHON tests/image/build-podman.sh
podman tag hippocampus-inference:latest "$IMAGE"
say "image $IMAGE ($(elapsed))"

# -- render the podman profile, make its Secret (podman 4.3 reads a secretKeyRef's podman secret as JSON of
#    base64 values; the chart only references it) and a network whose DNS resolves pod names ----------------
BROKER_TEMPLATE=$("$PYTHON" tests/kube/check_kube.py render --release "$RELEASE" --image "$IMAGE" --secret "$SECRET" \
    --gateway-port "$GATEWAY_PORT" --dicom-port "$DICOM_PORT" --redis-port "$REDIS_PORT" --output "$KUBE")
PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')
"$PYTHON" - "$PASSWORD" "$BROKER_TEMPLATE" <<'EOF' | podman secret create "$SECRET" - >/dev/null
import base64, json, sys
password, template = sys.argv[1:]
encode = lambda text: base64.b64encode(text.encode()).decode()
print(json.dumps({"password": encode(password), "url": encode(template.replace("{password}", password))}))
EOF
podman network create "$NETWORK" >/dev/null

# -- play ----------------------------------------------------------------------------------------------
played=1
podman kube play --network "$NETWORK" "$KUBE" >"$WORK/play.log" 2>&1 || { cat "$WORK/play.log"; exit 1; }
say "played: $(podman pod ps --format '{{.Name}}' | grep "^$RELEASE-" | tr '\n' ' ')($(elapsed))"

healthy() {  # healthy COMPONENT CONTAINER: its liveness probe (podman's healthcheck) passes
    podman healthcheck run "$(container "$1" "$2")" >/dev/null 2>&1
}
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local deadline=$(( $(date +%s) + $1 )) what=$2
    shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || { say "$what: not healthy after its wait"; exit 1; }
        sleep 2
    done
    say "$what healthy ($(elapsed))"
}
worker_ping() {
    podman exec "$(container worker worker)" sh -c 'celery -A worker inspect ping --destination "celery@$(hostname)" --timeout 10' >/dev/null 2>&1
}
wait_for 60 redis healthy redis redis
wait_for 300 gateway healthy gateway gateway
wait_for 300 dicom-node healthy dicom-node dicom-node
wait_for 300 "worker (celery ping)" worker_ping

# -- inside: users, capabilities, read-only root file system, the shared volumes writable ------------------
for part in gateway:/var/lib/inference/jobs worker:/var/lib/inference/jobs dicom-node:/var/lib/inference/pacs redis:/data; do
    name=$(container "${part%%:*}" "${part%%:*}")
    uid=$(podman exec "$name" id -u)
    [ "$uid" != 0 ] || { say "${part%%:*} runs as root"; exit 1; }
    caps=$(podman exec "$name" grep CapEff /proc/1/status | awk '{print $2}')
    [ "$caps" = 0000000000000000 ] || { say "${part%%:*} has capabilities $caps"; exit 1; }
    ! podman exec "$name" touch /probe-read-only 2>/dev/null || { say "${part%%:*} can write its root file system"; exit 1; }
    podman exec "$name" touch "${part#*:}/.kube-test" || { say "${part%%:*} cannot write ${part#*:}"; exit 1; }
    podman exec "$name" rm "${part#*:}/.kube-test"
    say "ok: ${part%%:*} runs as uid $uid, no capabilities, read-only root, ${part#*:} writable"
done

# -- Study1 through the node and a worker, back into the job outputs; the queue drains ----------------------
mapfile -t LISTS < <("$PYTHON" tests/kube/check_kube.py lists "$KUBE")
"$PYTHON" tests/kube/check_kube.py study --gateway-port "$GATEWAY_PORT" --dicom-port "$DICOM_PORT" \
    --redis-port "$REDIS_PORT" --study "$STUDY" --lists "${LISTS[@]}" \
    --node-container "$(container dicom-node dicom-node)" --worker-container "$(container worker worker)" \
    --redis-container "$(container redis redis)"
