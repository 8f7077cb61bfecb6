#!/usr/bin/env bash
# The container tools the stack test and `make stack-up` use: Debian's podman (with runc,
# fuse-overlayfs, slirp4netns, uidmap, netavark/aardvark-dns for service names),
# mmdebstrap for the air-gapped base images, and docker-compose v1, which drives podman
# through its Docker-compatible API (scripts/stack.sh). Then docker/podman/containers.conf
# as /etc/containers/containers.conf (runtime runc, ulimits within the hard limits) unless
# the machine has a containers.conf of its own. No-op when everything is there.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF=/etc/containers/containers.conf
MARK="# scripts/install_container_tools.sh"
SUDO=""
if [[ $EUID -ne 0 ]]; then SUDO="sudo"; fi

tools=(podman runc mmdebstrap docker-compose netavark)
missing=0
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || [[ -x "/usr/lib/podman/$tool" ]] || missing=1
done
if (( missing )); then
    echo "[install_container_tools] installing podman, runc, mmdebstrap, docker-compose" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        podman runc fuse-overlayfs slirp4netns uidmap netavark aardvark-dns iptables \
        catatonit conmon mmdebstrap docker-compose >/dev/null
fi
if [[ ! -e "$CONF" ]] || grep -qF "$MARK" "$CONF"; then
    { echo "$MARK (from docker/podman/containers.conf)"; cat "$REPO/docker/podman/containers.conf"; } \
        | $SUDO tee "$CONF" >/dev/null
else
    echo "[install_container_tools] keeping the machine's own $CONF" >&2
fi
