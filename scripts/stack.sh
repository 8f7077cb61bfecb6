#!/usr/bin/env bash
# The compose stack of docker/ (profile cpu: PostgreSQL, Redis, the Airflow components,
# two Celery workers and one vLLM CPU worker serving SmolLM2-135M-Instruct) on podman.
#
#   scripts/stack.sh up      build what is missing (scripts/build_images.sh), start the
#                            stack, wait until every service is healthy
#   scripts/stack.sh seed [SHARDS] [DOCS] [SAMPLES]   put sample shards, the SmolLM2 recipe
#                            (SAMPLES: its draws per pair, if given) and its tokenizer into
#                            the stack's data volume (/data/maga)
#   scripts/stack.sh down    remove every container, network and volume of the stack
#   scripts/stack.sh compose ARGS...   docker-compose with the stack's settings
#
# docker-compose v1 drives podman through podman's Docker-compatible API (a `podman system
# service` this script starts). Without systemd podman schedules no healthchecks, and
# compose waits on them (service_healthy): this script runs them at each container's
# configured interval while the stack is up.
#
# Settings (environment; the defaults fit this machine's SmolLM2 stack): MAGA_STACK_DIR
# (state: secrets, env file, logs; default var/stack), MAGA_STACK_PROJECT (maga),
# AIRFLOW_API_PORT (8080), MAGA_MODELS_DIR (var/models), MAGA_VLLM_CPU_DTYPE (float32),
# MAGA_VLLM_MAX_MODEL_LEN (4096), MAGA_VLLM_CPU_KVCACHE_GIB (1), and every other variable
# of docker/.env.example. Secrets are generated once into $MAGA_STACK_DIR/secrets.env.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${MAGA_STACK_DIR:-$REPO/var/stack}"
PROJECT="${MAGA_STACK_PROJECT:-maga}"
PY="${MAGA_PYTHON:-$REPO/.venv/bin/python}"
SMOLLM2="smollm2-135m-instruct"
START_TIMEOUT="${MAGA_STACK_START_TIMEOUT:-900}"
# podman's API service can stop answering once a client gives up on a slow request (seen
# here once in three runs, when compose's 60 s reads timed out while ten containers were
# created at once on two busy cores; podman issues 10862, 10090). So compose waits up to
# 10 minutes for an answer, the stack starts in two steps (the services nothing depends
# on first), and every podman command of this script is bounded, so a wedged service
# fails the command with a message instead of hanging the caller. (COMPOSE_PARALLEL_LIMIT
# is no cure: at 2 docker-compose 1.29 deadlocks on its own nested tasks.)
export COMPOSE_HTTP_TIMEOUT="${COMPOSE_HTTP_TIMEOUT:-600}"
PODMAN_TIMEOUT="${MAGA_PODMAN_TIMEOUT:-120}"

log() { echo "[stack] $*" >&2; }
pm() { timeout --kill-after=10 "$PODMAN_TIMEOUT" podman "$@"; }
die() { log "error: $*"; exit 1; }
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
SOCKET="$STATE/podman.sock"
export DOCKER_HOST="unix://$SOCKET"

# -- settings --------------------------------------------------------------------------
write_env() {
    if [[ ! -s "$STATE/secrets.env" ]]; then
        (umask 077 && "$PY" - >"$STATE/secrets.env" <<'PY'
import secrets
from cryptography.fernet import Fernet
# The S3 pair too: compose checks the variables of every profile, also the ones not run.
# Hex: a URL-safe token starts with "-" one time in 64, and the Airflow entrypoints pass
# the admin password as its own argument (`--password -x...` is read as an option: the
# user is never created and every login fails).
for name in ("AIRFLOW_JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "MAGA_DB_PASSWORD", "MAGA_API_KEY",
             "MAGA_S3_ACCESS_KEY", "MAGA_S3_SECRET_KEY"):
    print(f"{name}={secrets.token_hex(24)}")
print(f"AIRFLOW_FERNET_KEY={Fernet.generate_key().decode()}")
PY
        )
    fi
    local models
    models="$(cd "${MAGA_MODELS_DIR:-$REPO/var/models}" && pwd -P)"
    [[ -f "$models/$SMOLLM2/config.json" || -n "${MAGA_VLLM_MODEL:-}" ]] \
        || die "no model at $models/$SMOLLM2: run \`make smollm2-model\`"
    local endpoint="http://vllm-cpu-0:8000"
    (umask 077 && {
        cat "$STATE/images.env" "$STATE/secrets.env"
        cat <<EOF
AIRFLOW_API_PORT=${AIRFLOW_API_PORT:-8080}
MAGA_MODELS_DIR=$models
MAGA_VLLM_MODEL=${MAGA_VLLM_MODEL:-/models/$SMOLLM2}
MAGA_VLLM_SERVED_NAME=${MAGA_VLLM_SERVED_NAME:-$SMOLLM2}
MAGA_VLLM_CPU_DTYPE=${MAGA_VLLM_CPU_DTYPE:-float32}
MAGA_VLLM_MAX_MODEL_LEN=${MAGA_VLLM_MAX_MODEL_LEN:-4096}
MAGA_VLLM_MAX_NUM_SEQS=${MAGA_VLLM_MAX_NUM_SEQS:-32}
MAGA_VLLM_CPU_KVCACHE_GIB=${MAGA_VLLM_CPU_KVCACHE_GIB:-1}
MAGA_ENDPOINTS=${MAGA_ENDPOINTS:-$endpoint}
MAGA_WORKER_0_ENDPOINTS=${MAGA_WORKER_0_ENDPOINTS:-$endpoint}
MAGA_WORKER_1_ENDPOINTS=${MAGA_WORKER_1_ENDPOINTS:-$endpoint}
MAGA_RECIPE=${MAGA_RECIPE:-/data/maga/recipe.yaml}
MAGA_WORKER_CONCURRENCY=${MAGA_WORKER_CONCURRENCY:-4}
MAGA_LLM_POOL_SLOTS=${MAGA_LLM_POOL_SLOTS:-4}
MAGA_RETRY_DELAY_SECONDS=${MAGA_RETRY_DELAY_SECONDS:-120}
MAGA_LEASE_TTL_SECONDS=${MAGA_LEASE_TTL_SECONDS:-300}
AIRFLOW_TASK_HEARTBEAT_TIMEOUT=${AIRFLOW_TASK_HEARTBEAT_TIMEOUT:-300}
EOF
    }) >"$STATE/stack.env"
    # docker-compose 1.x predates the top-level `name` (the project name is -p here).
    sed '/^name: /d' "$REPO/docker/docker-compose.yml" >"$STATE/docker-compose.yml"
}

compose() {  # bounded by COMPOSE_TIMEOUT seconds (default the start timeout)
    timeout --kill-after=10 "${COMPOSE_TIMEOUT:-$START_TIMEOUT}" docker-compose --project-name "$PROJECT" --project-directory "$REPO/docker" \
        --env-file "$STATE/stack.env" -f "$STATE/docker-compose.yml" --profile cpu "$@"
}

# -- the podman API service and the healthcheck runner, one pid file each ---------------
running() { [[ -s "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_service() {
    running podman-service && return
    rm -f "$SOCKET"
    podman system service --time=0 "unix://$SOCKET" >"$STATE/podman-service.log" 2>&1 &
    echo $! >"$STATE/podman-service.pid"
    for _ in $(seq 50); do [[ -S "$SOCKET" ]] && return; sleep 0.2; done
    die "podman system service did not open $SOCKET (log: $STATE/podman-service.log)"
}

# A Go duration as podman prints it (30s, 1m0s, 1h0m0s; bare numbers are nanoseconds),
# in whole seconds.
seconds_of() {
    local d="$1" total=0
    [[ "$d" =~ ^[0-9]+$ ]] && { echo $((d / 1000000000)); return; }
    [[ "$d" =~ ([0-9]+)h ]] && total=$((total + BASH_REMATCH[1] * 3600))
    [[ "$d" =~ ([0-9]+)m([0-9]|$) ]] && total=$((total + BASH_REMATCH[1] * 60))
    [[ "$d" =~ ([0-9]+)(\.[0-9]+)?s$ ]] && total=$((total + BASH_REMATCH[1]))
    echo $((total > 0 ? total : 30))
}

# Runs each container's healthcheck at its interval (the first 5 s after it is seen), as
# systemd's timers would.
healthchecks() {
    declare -A next_at=()
    local now id interval
    while true; do
        now=$(date +%s)
        while read -r id interval; do
            [[ -n "$id" && -n "$interval" && "$interval" != none ]] || continue
            if [[ -z "${next_at[$id]:-}" ]]; then
                next_at[$id]=$((now + 5))
            elif (( now >= next_at[$id] )); then
                # </dev/null: podman would read the rest of the container list from stdin.
                timeout --kill-after=5 60 podman healthcheck run "$id" </dev/null >/dev/null 2>&1 || true
                next_at[$id]=$(( $(date +%s) + $(seconds_of "$interval") ))
            fi
        done < <(pm ps -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r timeout 60 podman inspect \
                    --format '{{.ID}} {{if .Config.Healthcheck}}{{.Config.Healthcheck.Interval}}{{else}}none{{end}}' 2>/dev/null)
        sleep 2
    done
}

start_healthchecks() {
    running healthchecks && return
    "$0" _healthchecks >"$STATE/healthchecks.log" 2>&1 &
    echo $! >"$STATE/healthchecks.pid"
}

stop_pid() {
    if running "$1"; then kill "$(cat "$STATE/$1.pid")" 2>/dev/null || true; fi
    rm -f "$STATE/$1.pid"
}

container_of() {  # SERVICE -> its container's name
    pm ps --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}

wait_healthy() {
    local deadline=$((SECONDS + START_TIMEOUT)) unhealthy
    while true; do
        unhealthy="$(pm ps --filter "label=com.docker.compose.project=$PROJECT" \
            --format '{{.Names}} {{.Status}}' || echo "podman did not answer in ${PODMAN_TIMEOUT}s")"
        unhealthy="$(grep -v '(healthy)' <<<"$unhealthy" || true)"
        [[ -z "$unhealthy" ]] && return
        (( SECONDS < deadline )) || { log "not healthy after ${START_TIMEOUT}s:"; echo "$unhealthy" >&2; return 1; }
        sleep 3
    done
}

cmd_up() {
    local started=$SECONDS
    MAGA_IMAGES_ENV="$STATE/images.env" bash "$REPO/scripts/build_images.sh"
    local built=$SECONDS
    write_env
    start_service
    start_healthchecks
    # The model server (the long pole) and the databases first, then the rest: compose
    # waits for their health before the Airflow containers, as the file says.
    { compose up -d --no-build --no-deps postgres redis vllm-cpu-0 && compose up -d --no-build; } \
        >"$STATE/compose-up.log" 2>&1 \
        || { tail -n 30 "$STATE/compose-up.log" >&2; die "compose up failed (log: $STATE/compose-up.log)"; }
    wait_healthy || die "the stack did not become healthy (scripts/stack.sh compose ps; compose logs)"
    log "up: images $((built - started)) s, start $((SECONDS - built)) s; Airflow at" \
        "http://127.0.0.1:$(grep '^AIRFLOW_API_PORT=' "$STATE/stack.env" | cut -d= -f2) (user admin," \
        "password in $STATE/secrets.env)"
}

cmd_seed() {  # [SHARDS] [DOCS_PER_SHARD] [REWRITE_SAMPLES]
    local shards="${1:-2}" docs="${2:-4}" samples="${3:-}" seed="$STATE/seed" scheduler
    scheduler="$(container_of airflow-scheduler)"
    [[ -n "$scheduler" ]] || die "the stack is not up"
    rm -rf "$seed" && mkdir -p "$seed/source" "$seed/tokenizer"
    "$PY" -m maga_tasks.cli -q sample-corpus "$seed/source" --shards "$shards" --docs-per-shard "$docs" >/dev/null
    local models
    models="$(grep '^MAGA_MODELS_DIR=' "$STATE/stack.env" | cut -d= -f2)"
    cp "$models/$SMOLLM2/tokenizer.json" "$seed/tokenizer/"
    # REWRITE_SAMPLES, when given, replaces the recipe's draws per pair (the stack test
    # asks 1: it tests the containers, not the yield, and each draw costs CPU minutes).
    "$PY" - "$seed/recipe.yaml" "$(grep '^MAGA_VLLM_SERVED_NAME=' "$STATE/stack.env" | cut -d= -f2)" "$samples" <<'PY'
import sys
from pathlib import Path
from maga_tasks.recipe import builtin_recipe_path, load_recipe, recipe_from_dict
recipe = load_recipe(builtin_recipe_path("smollm2-135m"), model=sys.argv[2], tokenizer="/data/maga/tokenizer")
if sys.argv[3]:
    fields = recipe.model_dump(mode="json")
    recipe = recipe_from_dict({**fields, "rewrite": {**fields["rewrite"], "samples": int(sys.argv[3])}})
Path(sys.argv[1]).write_text(recipe.to_yaml())
print(recipe.recipe_id)
PY
    for item in source tokenizer recipe.yaml; do
        pm cp "$seed/$item" "$scheduler:/data/maga/"
    done
}

cmd_down() {
    stop_pid healthchecks
    if [[ -s "$STATE/stack.env" ]] && running podman-service; then
        COMPOSE_TIMEOUT=300 compose down --volumes --remove-orphans --timeout 10 \
            >"$STATE/compose-down.log" 2>&1 || log "compose down failed; removing by label (log: $STATE/compose-down.log)"
    fi
    stop_pid podman-service
    # Whatever compose left (a container it lost track of, or all when the service hung):
    # by the project's label, straight through podman.
    local label="label=com.docker.compose.project=$PROJECT" left
    pm ps -aq --filter "$label" | xargs -r timeout 180 podman rm -f -t 0 >/dev/null || true
    pm volume ls -q --filter "$label" | xargs -r timeout 120 podman volume rm -f >/dev/null || true
    pm network ls -q --filter "$label" | xargs -r timeout 120 podman network rm -f >/dev/null || true
    rm -f "$SOCKET"
    left="$(pm ps -aq --filter "$label"; pm volume ls -q --filter "$label"; pm network ls -q --filter "$label")" \
        || die "down: podman did not answer in ${PODMAN_TIMEOUT}s: containers of $PROJECT may be left"
    [[ -z "$left" ]] || die "down: left behind: $(tr '\n' ' ' <<<"$left")"
    log "down: no container, volume or network of $PROJECT left"
}

case "${1:-}" in
    up) cmd_up ;;
    seed) shift; cmd_seed "$@" ;;
    down) cmd_down ;;
    compose) shift; write_env >/dev/null; COMPOSE_TIMEOUT="${COMPOSE_TIMEOUT:-0}" compose "$@" ;;  # 0: unbounded (logs -f)
    _healthchecks) healthchecks ;;
    *) echo "usage: $0 up | seed [SHARDS DOCS] | down | compose ARGS..." >&2; exit 2 ;;
esac
