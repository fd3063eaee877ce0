#!/usr/bin/env bash
# Build the project's images with podman on hosts that cannot pull (used by tests/image/run.sh and
# tests/kube/run.sh): the local stand-in base images (deploy/images/build-stand-ins.sh), then the
# gateway's image and, with --test-tool, the test tool's, under the tags docker-compose.yml names.
# pip inside the build uses this host's pip configuration (its mirrors, wheel folders, constraints,
# CA certificates): the settings `pip config list` shows, with the folders they name mounted read-only.
# Layers are cached: a second build after a code change redoes only the code layer.
#   PYTHON=.venv/bin/python tests/image/build-podman.sh [--test-tool]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/images/containers.conf}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

deploy/images/build-stand-ins.sh
mounts=()
while IFS= read -r path; do mounts+=(-v "$path:$path:ro"); done < <("$PYTHON" - "$WORK/pip.conf" <<'EOF'
import configparser, os, subprocess, sys
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    settings[key.rpartition(".")[2]] = value.strip("'\"")
settings.update(retries="1", timeout="10")  # unreachable extra indexes (the torch one) cost ~1 s each
config = configparser.ConfigParser()
config["global"] = settings
with open(sys.argv[1], "w") as out:
    config.write(out)
paths = {"/etc/ssl/certs"}
for value in settings.values():
    for word in value.split():
        # a local index (file://.../simple) links its files relative to itself (../../files): its parent too
        path = os.path.dirname(word.removeprefix("file://").rstrip("/")) if word.startswith("file://") else word
        if path.startswith("/") and os.path.exists(path):
            paths.add(path if os.path.isdir(path) else os.path.dirname(path))
print(*sorted(p for p in paths if os.path.exists(p)), sep="\n")
EOF
)
images=(hippocampus-inference:latest=Dockerfile)
[ "${1:-}" = --test-tool ] && images+=(hippocampus-inference-test-tool:latest=inference-test-tool/Dockerfile)
printf 'build-podman: building %s (pip settings of this host: %d mounts)\n' "${images[*]%%=*}" "${#mounts[@]}"
# the tags and Dockerfiles of the compose file's inference and test-tool services (context: .)
for image in "${images[@]}"; do
    podman build --network=host --pull=never --format docker -f "${image#*=}" \
        -v "$WORK/pip.conf:/etc/pip.conf:ro" "${mounts[@]}" -t "${image%%=*}" . >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log"; exit 1; }
done
