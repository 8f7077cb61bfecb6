#!/usr/bin/env bash
# Build the stack's images with podman, each tagged with a content hash of what it is
# built from (its Dockerfile, its context files, its base image's tag and its build
# args): an image whose inputs did not change is reused from local storage, not rebuilt.
#
# Bases (MAGA_IMAGE_BASES):
#   official   the official images (apache/airflow, python:*-slim, postgres, redis) from
#              a registry; the images of docker/ are built on them as shipped;
#   airgapped  no registry: a Debian bookworm rootfs from the site's mirror
#              (mmdebstrap --variant=minbase, MAGA_DEBIAN_MIRROR), imported, then the
#              stand-ins of docker/airgapped/ (Python, Airflow, PostgreSQL, Redis) built on
#              it with PyPI (or the site's index: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL);
#   auto       (default) official when the Docker Hub registry resolves, else airgapped.
# The CA bundle (MAGA_CA_BUNDLE, default the system bundle) goes into builds as the
# secret `ca_bundle` (TLS-intercepting proxies, private mirrors). pip inside the builds
# uses the host's index settings (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS,
# else pip's configuration); local indexes and wheel folders (and MAGA_WHEELS_DIR, default
# /opt/wheels, which holds the torch CPU wheel) are mounted read-only. Builds use the host
# network.
#
# Writes the image names for docker/docker-compose.yml to $MAGA_IMAGES_ENV (default
# var/stack/images.env) and prints one line per image: name, built or reused, seconds, size.
#
# Usage: scripts/build_images.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="$REPO/docker"
AIRGAPPED="$DOCKER/airgapped"
BASES="${MAGA_IMAGE_BASES:-auto}"
MIRROR="${MAGA_DEBIAN_MIRROR:-http://deb.debian.org}"
CA_BUNDLE="${MAGA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WHEELS="${MAGA_WHEELS_DIR:-/opt/wheels}"
IMAGES_ENV="${MAGA_IMAGES_ENV:-$REPO/var/stack/images.env}"
WORK="${MAGA_IMAGE_WORK_DIR:-/var/tmp/maga-images}"

log() { echo "[build_images] $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v podman >/dev/null || die "podman is not installed (scripts/install_container_tools.sh)"
if [[ "$BASES" == auto ]]; then
    if getent hosts registry-1.docker.io >/dev/null 2>&1; then BASES=official; else BASES=airgapped; fi
fi
[[ "$BASES" == official || "$BASES" == airgapped ]] || die "MAGA_IMAGE_BASES must be official, airgapped or auto"
mkdir -p "$WORK" "$(dirname "$IMAGES_ENV")"

# Content hash of files (paths relative to $REPO) plus extra strings: 16 hex digits.
content_hash() {
    local extra="$1"; shift
    {
        printf '%s\n' "$extra"
        (cd "$REPO" && git ls-files -co --exclude-standard -- "$@" | LC_ALL=C sort \
            | while IFS= read -r file; do [[ -f "$file" ]] && printf '%s %s\n' "$file" "$(sha256sum <"$file" | cut -c1-64)"; done)
    } | sha256sum | cut -c1-16
}

# docker format: OCI images drop HEALTHCHECK.
common_args=(--network host --layers --format docker)
[[ -s "$CA_BUNDLE" ]] && common_args+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
# The host's pip settings (environment first, then pip's configuration files), so builds
# resolve where the host resolves: its index, its extra indexes and wheel folders. Local
# ones (file:// URLs, directories) are mounted read-only at the same path.
HOST_PIP="${MAGA_HOST_PIP:-$(command -v pip3 || echo "$REPO/.venv/bin/pip")}"
host_pip() {  # NAME (index-url, extra-index-url, find-links): its value, or nothing
    local variable="PIP_$(tr 'a-z-' 'A-Z_' <<<"$1")"
    if [[ -n "${!variable:-}" ]]; then echo "${!variable}"; return; fi
    [[ -x "$HOST_PIP" ]] && "$HOST_PIP" config get "global.$1" 2>/dev/null || true
}
mounts=()
declare -A mounted=()
local_sources() {  # KIND (index|links) SOURCES VAR: VAR= the sources that exist; mounts the local ones
    local kept=() item path
    for item in $2; do
        path="${item#file://}"
        if [[ "$item" == file://* || "$item" == /* ]]; then
            [[ -e "$path" ]] || continue
            # An index's pages link to files beside its simple/ folder: mount its parent.
            [[ "$1" == index ]] && path="$(dirname "$path")"
            [[ -n "${mounted[$path]:-}" ]] && { [[ " ${kept[*]} " == *" $item "* ]] || kept+=("$item"); continue; }
            mounted[$path]=1
            mounts+=(--volume "$path:$path:ro")
        fi
        [[ " ${kept[*]} " == *" $item "* ]] || kept+=("$item")
    done
    printf -v "$3" '%s' "${kept[*]}"
}
index_url="$(host_pip index-url)"
local_sources index "$(host_pip extra-index-url)" extra_indexes
local_sources links "$(host_pip find-links) $WHEELS" find_links
[[ -n "$index_url" ]] && common_args+=(--build-arg "PIP_INDEX_URL=$index_url")
common_args+=(--build-arg "PIP_FIND_LINKS=$find_links" "${mounts[@]}")
pip_args=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_indexes")
[[ -n "${PIP_TRUSTED_HOST:-}" ]] && common_args+=(--build-arg "PIP_TRUSTED_HOST=$PIP_TRUSTED_HOST")

# build NAME TAG CONTEXT DOCKERFILE [podman build args...]: builds localhost/NAME:TAG
# unless it exists; prints its line.
build() {
    local name="$1" tag="$2" context="$3" dockerfile="$4"; shift 4
    local image="localhost/$name:$tag" started=$SECONDS how=reused
    if ! podman image exists "$image"; then
        how=built
        log "building $image"
        podman build "${common_args[@]}" "$@" -f "$dockerfile" -t "$image" "$context" \
            >"$WORK/$name.log" 2>&1 || { tail -n 40 "$WORK/$name.log" >&2; die "$name: build failed (log: $WORK/$name.log)"; }
        # Older builds of the image go (each tag holds up to gigabytes); one a container
        # still uses stays (podman refuses), and so do the layers the new build shares.
        podman images --format '{{.Repository}}:{{.Tag}}' "localhost/$name" | grep -vxF "$image" \
            | xargs -r podman rmi >/dev/null 2>&1 || true
    fi
    printf '%-22s %-7s %4ds %s\n' "$image" "$how" $((SECONDS - started)) \
        "$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
}

# -- bases --------------------------------------------------------------------------------
if [[ "$BASES" == airgapped ]]; then
    suites=("deb $MIRROR/debian bookworm main" "deb $MIRROR/debian bookworm-updates main"
            "deb $MIRROR/debian-security bookworm-security main")
    debian="localhost/maga-debian:bookworm-$(printf '%s\n' "${suites[@]}" | sha256sum | cut -c1-12)"
    if ! podman image exists "$debian"; then
        command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (scripts/install_container_tools.sh)"
        started=$SECONDS
        log "making a Debian bookworm rootfs from $MIRROR"
        rm -f "$WORK/rootfs.tar"
        mmdebstrap --quiet --variant=minbase bookworm "$WORK/rootfs.tar" "${suites[@]}"
        podman import --quiet --change 'CMD ["/bin/bash"]' "$WORK/rootfs.tar" "$debian" >/dev/null
        rm -f "$WORK/rootfs.tar"
        printf '%-22s %-7s %4ds\n' "$debian" built $((SECONDS - started))
    fi
    debian_args=(--build-arg "DEBIAN_IMAGE=$debian")
    python_tag="$(content_hash "$debian" docker/airgapped/Dockerfile.python)"
    build maga-python "$python_tag" "$AIRGAPPED" "$AIRGAPPED/Dockerfile.python" "${debian_args[@]}"
    python_base="localhost/maga-python:$python_tag"
    airflow_base_tag="$(content_hash "$python_base ${common_args[*]} ${pip_args[*]}" docker/airgapped/Dockerfile.airflow docker/airgapped/entrypoint.sh)"
    airflow_base="localhost/maga-airflow-base:$airflow_base_tag"
    postgres_tag="$(content_hash "$debian" docker/airgapped/Dockerfile.postgres docker/airgapped/postgres-entrypoint.sh)"
    redis_tag="$(content_hash "$debian" docker/airgapped/Dockerfile.redis)"
    POSTGRES_IMAGE="localhost/maga-postgres:$postgres_tag"
    REDIS_IMAGE="localhost/maga-redis:$redis_tag"
    vllm_base_args=(--build-arg "PYTHON_BASE_IMAGE=$python_base")
else
    airflow_base="apache/airflow:3.3.2-python3.11"
    python_base="python:3.11-slim-bookworm"
    POSTGRES_IMAGE="postgres:16-bookworm"
    REDIS_IMAGE="redis:7.2-bookworm"
    vllm_base_args=()
fi

# The torch CPU wheel from a local wheel folder when there is one; else from the PyTorch index.
vllm_args=("${vllm_base_args[@]}")
if compgen -G "${WHEELS}/torch-*.whl" >/dev/null; then
    vllm_args+=("${pip_args[@]}")
else
    vllm_args+=(--build-arg "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu $extra_indexes")
fi
vllm_tag="$(content_hash "$python_base ${vllm_args[*]} ${common_args[*]}" docker/Dockerfile.vllm-cpu)"
airflow_context=(pyproject.toml README.md maga_tasks sql dags plugins
                 docker/Dockerfile.airflow docker/Dockerfile.airflow.dockerignore)

# The Airflow chain and the vLLM image download side by side; the small images after.
(
    if [[ "$BASES" == airgapped ]]; then
        build maga-airflow-base "$airflow_base_tag" "$AIRGAPPED" "$AIRGAPPED/Dockerfile.airflow" \
            --build-arg "PYTHON_IMAGE=$python_base" "${pip_args[@]}"
    fi
    airflow_tag="$(content_hash "$airflow_base ${common_args[*]} ${pip_args[*]}" "${airflow_context[@]}")"
    build maga-airflow "$airflow_tag" "$REPO" "$DOCKER/Dockerfile.airflow" \
        --ignorefile "$DOCKER/Dockerfile.airflow.dockerignore" --build-arg "AIRFLOW_BASE_IMAGE=$airflow_base" \
        "${pip_args[@]}"
    echo "localhost/maga-airflow:$airflow_tag" >"$WORK/airflow.image"
) & airflow_job=$!
build maga-vllm-cpu "$vllm_tag" "$DOCKER" "$DOCKER/Dockerfile.vllm-cpu" "${vllm_args[@]}"
if [[ "$BASES" == airgapped ]]; then
    build maga-postgres "$postgres_tag" "$AIRGAPPED" "$AIRGAPPED/Dockerfile.postgres" "${debian_args[@]}"
    build maga-redis "$redis_tag" "$AIRGAPPED" "$AIRGAPPED/Dockerfile.redis" "${debian_args[@]}"
fi
wait "$airflow_job" || die "the Airflow image did not build"

cat >"$IMAGES_ENV" <<EOF
MAGA_AIRFLOW_IMAGE=$(cat "$WORK/airflow.image")
MAGA_VLLM_CPU_IMAGE=localhost/maga-vllm-cpu:$vllm_tag
MAGA_POSTGRES_IMAGE=$POSTGRES_IMAGE
MAGA_REDIS_IMAGE=$REDIS_IMAGE
EOF
log "images ($BASES bases) in $IMAGES_ENV"
