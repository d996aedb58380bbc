#!/usr/bin/env bash
# Build docker/Dockerfile without a docker daemon (podman/buildah: vfs storage, chroot isolation),
# start the image, and check /health and one completion. Not run by CI: it downloads ~1 GB and
# takes many minutes.
#
#   bash docker/build_check.sh                        # torch from PyTorch's CPU index
#   TORCH_INDEX=https://pypi.org/simple TORCH_FIND_LINKS=/opt/wheels bash docker/build_check.sh
#       # torch from a local folder of wheels (mounted into the build; a +cpu wheel there wins)
#   STAND_IN_BASE=1 bash docker/build_check.sh
#       # where no container registry is reachable: a Debian bookworm root filesystem (debootstrap,
#       # python3 in a venv on PATH) tagged as the Dockerfile's base image, so the build pulls nothing
#
# Runs as root (apt-get for podman, buildah, debootstrap). The container runs with `podman run`
# where its OCI runtime can start one, else with `buildah run --isolation chroot` (no cgroups
# needed), the ENTRYPOINT spelled out.
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/sluice:check}
PORT=${PORT:-18321}
BASE=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' docker/Dockerfile | head -1)
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-}
WORK=$(mktemp -d)
CONTAINER=""
SERVER_PID=""

cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$CONTAINER" ] && { podman rm -f "$CONTAINER" >/dev/null 2>&1 || buildah rm "$CONTAINER" >/dev/null 2>&1 || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    command -v podman >/dev/null && command -v buildah >/dev/null && return
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah crun uidmap >/dev/null
}

storage() {
    # vfs: no overlay mounts or fuse needed inside a container or VM
    mkdir -p /etc/containers
    [ -f /etc/containers/storage.conf ] || printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
        > /etc/containers/storage.conf
}

stand_in_base() {
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        http://deb.debian.org/debian >/dev/null
    chroot "$WORK/rootfs" python3 -m venv /opt/python
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"  # this host's CAs (proxies)
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -cf "$WORK/base.tar" .
    podman import --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' "$WORK/base.tar" "docker.io/library/$BASE" >/dev/null
}

build() {
    local volume=()
    [ -n "$TORCH_FIND_LINKS" ] && volume=(-v "$TORCH_FIND_LINKS:/wheels:ro")
    podman build --format docker --isolation chroot --network host --pull=never "${volume[@]}" \
        --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg TORCH_FIND_LINKS="${TORCH_FIND_LINKS:+/wheels}" \
        -f docker/Dockerfile -t "$IMAGE" .
}

start() {
    CONTAINER=sluice-check-$$
    if podman run -d --name "$CONTAINER" --network host "$IMAGE" --host 127.0.0.1 --port "$PORT" >/dev/null 2>"$WORK/run.err"; then
        return
    fi
    echo "podman run failed ($(tail -1 "$WORK/run.err")); starting it with buildah run --isolation chroot"
    podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
    CONTAINER=$(buildah from --pull-never --name "$CONTAINER" "$IMAGE")
    buildah run --isolation chroot --network host "$CONTAINER" -- sluice serve --host 127.0.0.1 --port "$PORT" \
        >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
}

check() {
    local url=http://127.0.0.1:$PORT
    for _ in $(seq 1 300); do
        curl -sf "$url/health" >/dev/null && break
        sleep 2
    done
    curl -sf "$url/health" >/dev/null || { echo "no /health after 10 minutes"; cat "$WORK/server.log" 2>/dev/null; exit 1; }
    echo "/health: 200"
    local model
    model=$(curl -sf "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
    curl -sf "$url/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("completion:", repr(r["choices"][0]["text"]), r["usage"])'
}

need
storage
if [ "${STAND_IN_BASE:-0}" = 1 ]; then stand_in_base; fi
build
start
check
echo "docker/build_check.sh: OK ($IMAGE)"
