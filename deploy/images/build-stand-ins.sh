#!/usr/bin/env bash
# Local stand-ins for the base images the compose stack names, for podman hosts that cannot pull
# from a registry: python:3.11-slim-bookworm (the Dockerfiles' FROM), redis:7.2-alpine and
# jodogne/orthanc-plugins:1.10.1. Each is a Debian bookworm root file system made by mmdebstrap
# from this host's apt sources, imported under the name compose uses. A Docker host pulls the real
# images and never needs this.
#   deploy/images/build-stand-ins.sh            # build the missing ones (an existing image is kept)
#   deploy/images/build-stand-ins.sh --rebuild  # build all three again
# Needs root, podman and mmdebstrap (Debian packages). The images carry the label
# org.hippoai.stand-in=1, so `podman images --filter label=org.hippoai.stand-in=1` lists them.
set -euo pipefail

PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
REDIS_IMAGE=docker.io/library/redis:7.2-alpine
ORTHANC_IMAGE=docker.io/jodogne/orthanc-plugins:1.10.1
SUITE=bookworm
# apt sources of this host (a mirror or proxy configured here is what the build can reach)
SOURCES=${STAND_IN_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
[ -e "$SOURCES" ] || SOURCES=/etc/apt/sources.list
# the shared libraries Python's standard modules load (ssl, sqlite3, ctypes, lzma, bz2, readline, curses)
COMMON=ca-certificates,netbase,tzdata
PYTHON_PACKAGES=$COMMON,python3.11,python3-pip,libssl3,libffi8,libsqlite3-0,zlib1g,libbz2-1.0,liblzma5,libreadline8,libncursesw6

rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

log() { printf 'build-stand-ins: %s\n' "$*" >&2; }

# build NAME REVISION PACKAGES HOOK CHANGE...: one rootfs (mmdebstrap, tarball on stdout) imported as NAME.
# REVISION counts changes to a stand-in's recipe: an existing image of an older revision is built again.
build() {
    local name=$1 revision=$2 packages=$3 hook=$4 existing
    shift 4
    existing=0
    if podman image exists "$name"; then
        existing=$(podman image inspect --format '{{ index .Labels "org.hippoai.stand-in.revision" }}' "$name")
        # images from before revisions were labelled are revision 1
        case $existing in ''|'<no value>') existing=1 ;; esac
    fi
    if [ "$rebuild" = 0 ] && [ "$existing" -ge "$revision" ]; then
        log "$name exists (kept; --rebuild builds it again)"
        return
    fi
    log "building $name from Debian $SUITE ($packages)"
    local changes=(--change "LABEL org.hippoai.stand-in=1" --change "LABEL org.hippoai.stand-in.revision=$revision")
    for change in "$@"; do changes+=(--change "$change"); done
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --customize-hook="$hook" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/share/doc "$1"/usr/share/man' \
        "$SUITE" - "$SOURCES" \
        | podman import --quiet "${changes[@]}" - "$name" >/dev/null
}

# Python as the official image has it: python, python3 and pip on PATH under /usr/local/bin, pip
# allowed to install system-wide (no EXTERNALLY-MANAGED marker; Debian's pip installs under /usr/local).
build "$PYTHON_IMAGE" 1 "$PYTHON_PACKAGES" \
    'for n in python python3; do ln -sf /usr/bin/python3.11 "$1/usr/local/bin/$n"; done;
     ln -sf /usr/bin/pip3 "$1/usr/local/bin/pip";
     rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED;
     chroot "$1" python -c "import ssl, sqlite3, ctypes, lzma, bz2, readline, curses, venv"' \
    'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'ENV LANG=C.UTF-8' 'CMD ["python3"]'

# Redis as the official image runs it: working folder /data owned by its redis user (uid 999, gid 1000, so a
# pod running as 999 writes there: deploy/helm), programs on PATH, protected mode off (the official build
# turns it off; the compose network is the boundary), redis-cli for the healthcheck.
build "$REDIS_IMAGE" 2 "$COMMON,redis-server" \
    'mkdir -p "$1/data"; chown 999:1000 "$1/data";
     printf "%s\n" "#!/bin/sh" "[ \"\$1\" = redis-server ] && set -- \"\$@\" --protected-mode no" "exec \"\$@\"" \
        > "$1/usr/local/bin/docker-entrypoint.sh";
     chmod 755 "$1/usr/local/bin/docker-entrypoint.sh"' \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' 'WORKDIR /data' 'EXPOSE 6379' 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["redis-server"]'

# Orthanc 1.10 with its DICOMweb plugin (Debian's packages); like the jodogne image, the entrypoint is
# Orthanc and the command its configuration file (deploy/orthanc/orthanc.json lists Debian's plugin path).
build "$ORTHANC_IMAGE" 1 "$COMMON,orthanc,orthanc-dicomweb" \
    'mkdir -p "$1/var/lib/orthanc/db"' \
    'EXPOSE 4242' 'EXPOSE 8042' 'ENTRYPOINT ["/usr/sbin/Orthanc"]' 'CMD ["/etc/orthanc/orthanc.json"]'

podman images --filter label=org.hippoai.stand-in=1 --format '{{.Repository}}:{{.Tag}} {{.Size}}' >&2
