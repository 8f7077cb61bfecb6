#!/usr/bin/env bash
# The one-command demo (`make demo`): the nightly DAG run once on local defaults.
#
#  1. sample source shards of real English text (Wikipedia summaries) in var/demo/source;
#  2. a model: the real SmolLM2-135M-Instruct, prepared once from its PyPI package
#     (scripts/prepare_smollm2.sh), with its recipe (recipes/smollm2-135m.yaml); or, with
#     MAGA_DEMO_MODEL=tiny, the tiny local model whose text is random (its mechanics are real);
#  3. a local vLLM CPU worker with an API key (stopped again on exit), unless
#     MAGA_DEMO_ENDPOINT names a running server (then MAGA_API_KEY is its key);
#  4. an isolated Airflow (AIRFLOW_HOME=var/airflow, SQLite metadata DB, pool maga_llm)
#     running `airflow dags test maga_corpus_expansion` over the sample shards, with the
#     registry in SQLite (var/demo/expanded/_registry.sqlite) and outputs on local disk;
#  5. the summary (`maga status`) and where the outputs are.
#
# Idempotent: a second run publishes nothing new (every shard is already registered).
# `scripts/demo.sh ui` (`make demo-ui`) then serves the Airflow UI on the demo's home: the
# run's grid, its task logs, the MAGA corpus dashboard on the demo's registry.
# Needs `make install` and `make vllm-venv` (what `make demo` runs first).
#
# Environment: MAGA_DEMO_DIR (default: var/ of the repository), MAGA_DEMO_MODEL (smollm2,
# the default, or tiny), MAGA_DEMO_MODELS_DIR (where prepared models are kept, default
# var/models), MAGA_DEMO_MODEL_DIR (a local model directory instead),
# MAGA_DEMO_ENDPOINT, MAGA_DEMO_SHARDS / MAGA_DEMO_DOCS_PER_SHARD (2 / 4: about 5 minutes
# of generation at the ~100 output tok/s SmolLM2 makes on 2 CPU cores), MAGA_PYTHON (the
# project venv's python), MAGA_VLLM_PYTHON / MAGA_VLLM_VENV (the vLLM venv),
# MAGA_DEMO_PARALLELISM (shard tasks at once, 2), MAGA_DEMO_UI_PORT (the UI's port, 8080),
# MAGA_DEMO_RUN_TIMEOUT (seconds the DAG run may take before it is stopped and its task
# states shown, 1800).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${MAGA_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
VAR="$(mkdir -p "${MAGA_DEMO_DIR:-$REPO/var}" && cd "${MAGA_DEMO_DIR:-$REPO/var}" && pwd)"
DEMO="$VAR/demo"
SOURCE="$DEMO/source"
OUTPUT_ROOT="$DEMO/expanded"
REGISTRY="$OUTPUT_ROOT/_registry.sqlite"
SHARDS="${MAGA_DEMO_SHARDS:-2}"
DOCS_PER_SHARD="${MAGA_DEMO_DOCS_PER_SHARD:-4}"
STARTED=$SECONDS

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[[ -x "$PY" ]] || die "no project virtualenv at $PY: run \`make install\` (or \`make demo\`)"
[[ -x "$BIN/airflow" ]] || die "no airflow next to $PY: run \`make install\`"
mkdir -p "$DEMO/logs"

# -- `scripts/demo.sh ui` (`make demo-ui`): the Airflow UI on the demo's runs -------------
# A command of its own, in the foreground until Ctrl-C, rather than a server `make demo`
# leaves behind: a make target that returns while a server keeps a port and the SQLite
# file busy leaves nobody to stop it, and a second `make demo` would meet it. Here the
# terminal that started the UI owns it, shows its log, and stopping it is Ctrl-C.
serve_ui() {
  local home="$VAR/airflow" port="${MAGA_DEMO_UI_PORT:-8080}"
  [[ -f "$home/demo-env.sh" && -f "$home/airflow.db" ]] || die "no demo run in $home: run \`make demo\` first"
  for name in $(compgen -e); do case "$name" in AIRFLOW_*) unset "$name" ;; esac; done
  # shellcheck disable=SC1091
  source "$home/demo-env.sh"
  # The dashboard reads the demo's registry; the simple auth manager's default user admin
  # gets a password generated once into the home ([core] simple_auth_manager_passwords_file).
  export MAGA_REGISTRY_URL="$REGISTRY" AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT="$port" \
    AIRFLOW__API__BASE_URL="http://127.0.0.1:$port" AIRFLOW__API__WORKERS=1
  step "Airflow UI (api-server) on the demo's home $home, dashboard on $REGISTRY"
  "$BIN/airflow" api-server --host 127.0.0.1 --port "$port" --workers 1 &
  UI_PID=$!
  trap 'kill "$UI_PID" 2>/dev/null || true; wait "$UI_PID" 2>/dev/null || true' EXIT
  trap 'exit 130' INT TERM
  "$PY" scripts/demo.py wait-http "http://127.0.0.1:$port/api/v2/monitor/health" --pid "$UI_PID" --timeout 180 \
    || die "the api-server did not start (is port $port taken? set MAGA_DEMO_UI_PORT)"
  cat <<EOF

==> The Airflow UI is up: http://127.0.0.1:$port/
    log in as admin, password in $home/simple_auth_manager_passwords.json.generated
    the demo's run:  http://127.0.0.1:$port/dags/maga_corpus_expansion (task logs under each shard)
    MAGA corpus:     http://127.0.0.1:$port/plugin/maga-corpus (or "MAGA corpus" in the Browse menu)
    Ctrl-C stops it.
EOF
  wait "$UI_PID"
}
if [[ "${1:-}" == ui ]]; then
  serve_ui
  exit
fi

# -- 1. sample shards -------------------------------------------------------------------
step "sample corpus: $SHARDS shards x $DOCS_PER_SHARD documents in $SOURCE"
if [[ -f "$SOURCE/part-$(printf '%04d' $((SHARDS - 1))).parquet" ]]; then
  echo "already there"
else
  "$PY" -m maga_tasks.cli -q sample-corpus "$SOURCE" --shards "$SHARDS" --docs-per-shard "$DOCS_PER_SHARD" >/dev/null
  ls "$SOURCE"
fi

# -- 2. model and recipe ----------------------------------------------------------------
step "model"
PREPARED="$("$PY" scripts/demo.py prepare --models-dir "${MAGA_DEMO_MODELS_DIR:-$VAR/models}" --recipe-out "$DEMO/recipe.yaml" \
  ${MAGA_DEMO_ENDPOINT:+--endpoint "$MAGA_DEMO_ENDPOINT"})" || die "could not prepare a model and recipe"
eval "$PREPARED"  # MODEL_KIND, MODEL_DIR, SERVED_NAME, MAX_MODEL_LEN, DTYPE, RECIPE, RECIPE_ID
echo "model: $SERVED_NAME ($MODEL_KIND) from $MODEL_DIR"
echo "recipe: $RECIPE (recipe_id $RECIPE_ID)"
if [[ "$MODEL_KIND" == tiny ]]; then
  echo "NOTE: the tiny model's text is random (random weights): read the outputs for their"
  echo "      shape, token counts and bookkeeping, not for their words."
fi

# -- 3. the vLLM worker -----------------------------------------------------------------
VLLM_STATE="$VAR/vllm"
stop_worker() {
  "$PY" -m maga_tasks.llm.vllm_local stop --state-dir "$VLLM_STATE" --name demo >/dev/null 2>&1 || true
}
SERVER_SLOTS=0  # a running server's slots are unknown here; the one started below has 64
WORKER_STARTED="" EXEC_API_PID=""
DAG_PID=""
cleanup() {  # what this script started, by its PID (the worker by the PID it recorded); the
  # DAG run's guard stops every process below it on SIGTERM
  local pid
  for pid in $DAG_PID $EXEC_API_PID; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [[ -n "$WORKER_STARTED" ]]; then stop_worker; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ -n "${MAGA_DEMO_ENDPOINT:-}" ]]; then
  ENDPOINT="$MAGA_DEMO_ENDPOINT"
  step "vLLM worker: using the running server at $ENDPOINT"
else
  # A fresh key per demo run: the worker requires it, the DAG's tasks send it, no log shows it.
  MAGA_API_KEY="demo-$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
  export MAGA_API_KEY
  stop_worker  # a worker left behind by an interrupted demo (found by its recorded PID)
  WORKER_STARTED=1
  step "vLLM worker: starting $SERVED_NAME on a free loopback port (about a minute on 2 cores)"
  ENDPOINT="$("$PY" -m maga_tasks.llm.vllm_local start --state-dir "$VLLM_STATE" --name demo \
    --model "$MODEL_DIR" --served-model-name "$SERVED_NAME" --max-model-len "$MAX_MODEL_LEN" --dtype "$DTYPE" \
    --max-num-seqs 64 --api-key-env MAGA_API_KEY 2>>"$DEMO/logs/vllm-start.log" | tail -n 1)" \
    || die "the vLLM worker did not start; see $DEMO/logs/vllm-start.log and $VLLM_STATE/demo.log"
  echo "healthy at $ENDPOINT (log $VLLM_STATE/demo.log)"
  # Told to the tasks as a deployment tells them (0 measures windows that start at 8).
  SERVER_SLOTS=${MAGA_DEMO_SERVER_SLOTS:-64}
fi

# -- 4. Airflow, isolated, on SQLite ----------------------------------------------------
step "Airflow: isolated home $VAR/airflow, SQLite metadata DB"
for name in $(compgen -e); do  # nothing from the caller's Airflow may leak in
  case "$name" in AIRFLOW_*) unset "$name" ;; esac
done
export AIRFLOW_HOME="$VAR/airflow"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$REPO/plugins"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=True
export MAGA_RETRY_DELAY_SECONDS=5 MAGA_HEALTH_POKE_SECONDS=5
mkdir -p "$AIRFLOW_HOME"
cat >"$AIRFLOW_HOME/demo-env.sh" <<EOF
# The demo's Airflow environment: source it to use the Airflow CLI on the demo's runs.
export AIRFLOW_HOME='$AIRFLOW_HOME'
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN='$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN'
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER='$AIRFLOW__CORE__DAGS_FOLDER'
export AIRFLOW__CORE__PLUGINS_FOLDER='$AIRFLOW__CORE__PLUGINS_FOLDER'
export PATH='$BIN':\$PATH
EOF
# Task logs: `airflow dags test` alone runs each task inside its own process and writes no
# task log file, so the UI would have nothing to show ("Could not read served logs").
# With --use-executor the LocalExecutor runs each task under Airflow's supervisor, which
# writes the task's log to $AIRFLOW_HOME/logs/dag_id=.../attempt=N.log, as in production;
# the supervised tasks talk to the execution API, served by an api-server of this run
# (execution app only, on a free loopback port, stopped on exit).
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__PARALLELISM="${MAGA_DEMO_PARALLELISM:-2}"  # shards at once; 2 cores
EXEC_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$EXEC_PORT/execution/"
# The executor signs each task's token, the execution API checks it: one secret, this run only.
AIRFLOW__API_AUTH__JWT_SECRET="$("$PY" -c 'import secrets; print(secrets.token_hex(32))')"
export AIRFLOW__API_AUTH__JWT_SECRET
"$BIN/airflow" db migrate >"$DEMO/logs/airflow-db-migrate.log" 2>&1 \
  || die "airflow db migrate failed; see $DEMO/logs/airflow-db-migrate.log"
"$BIN/airflow" pools set maga_llm 8 "vLLM request streams" >/dev/null
echo "metadata DB migrated, pool maga_llm ready"

# -- 5. the nightly DAG, once -----------------------------------------------------------
"$PY" scripts/demo.py snapshot --registry "$REGISTRY" --recipe-id "$RECIPE_ID" --endpoint "$ENDPOINT" \
  --out "$DEMO/logs/before.json"
# The operator's side: the endpoint and the recipes folder (a run's conf only names a
# recipe in it and may choose among the configured endpoints; it cannot add one).
export MAGA_ENDPOINTS="$ENDPOINT" MAGA_RECIPES_DIR="$(dirname "$RECIPE")" MAGA_DATA_ROOTS="$DEMO"
# Every shard keeps its Data Docs site here (production keeps a sample of passing ones).
CONF="$("$PY" -c 'import json, sys; print(json.dumps({
    "source": sys.argv[1], "output_root": sys.argv[2], "recipe": sys.argv[3],
    "planning_mode": "flat", "shards_per_run": int(sys.argv[4]), "max_concurrency": 32, "progress_interval_s": 5,
    "server_slots": int(sys.argv[5]), "data_docs_sample_rate": 1.0}))' \
  "$SOURCE" "$OUTPUT_ROOT" "$(basename "$RECIPE" .yaml)" "$SHARDS" "$SERVER_SLOTS")"
DAG_LOG="$DEMO/logs/dags-test-$(date -u +%Y%m%dT%H%M%SZ).log"
step "Airflow execution API for the run's tasks on 127.0.0.1:$EXEC_PORT"
"$BIN/airflow" api-server --apps execution --host 127.0.0.1 --port "$EXEC_PORT" --workers 1 \
  >"$DEMO/logs/execution-api.log" 2>&1 &
EXEC_API_PID=$!
"$PY" scripts/demo.py wait-http "http://127.0.0.1:$EXEC_PORT/execution/health" --pid "$EXEC_API_PID" --timeout 180 \
  || die "the execution API did not start; see $DEMO/logs/execution-api.log"
step "airflow dags test maga_corpus_expansion (full log: $DAG_LOG)"
echo "conf: $CONF"
# The full log goes to $DAG_LOG; the screen gets the library's milestones and the outcome.
# The run writes to the file, not into a pipe: a task process that outlived it would hold
# a pipe open and keep the screen's filter waiting; `tail --pid` ends with the run.
# `dags test` waits as long as a task is unfinished: past the timeout it is stopped (124).
# Its executor's workers ignore SIGINT and its task processes leave this script's process
# group, so it runs under a guard (`process_tree`) that stops every process below it.
RUN_TIMEOUT="${MAGA_DEMO_RUN_TIMEOUT:-1800}"
"$PY" -m maga_tasks.tools.process_tree --timeout "$RUN_TIMEOUT" -- "$BIN/airflow" dags test maga_corpus_expansion --use-executor --conf "$CONF" \
  >"$DAG_LOG" 2>&1 </dev/null &
DAG_PID=$!
set +e  # the filter finds nothing when the run fails early; the run's own status decides
tail -n +1 -F --pid="$DAG_PID" "$DAG_LOG" 2>/dev/null \
  | grep --line-buffered -E '\[maga_tasks\.|_maga_corpus_expansion\]|DagRun Finished' \
  | grep --line-buffered -v ' totals: {' \
  | sed -u -E \
      -e 's/^.*DagRun Finished: .*run_duration=([0-9]+)[0-9.]*, state=([a-z_]+).*$/  DAG run finished: \2 in \1 s/' \
      -e 's/^[0-9-]+[T ]([0-9:]{8})[^ ]* +\[[a-z ]+\] (.*) \[[^]]+\] [a-z_]+=.*$/  \1 \2/'
wait "$DAG_PID"
DAG_STATUS=$?
set -e
DAG_PID=""
if [[ $DAG_STATUS -eq 124 ]]; then
  printf 'demo: the DAG run did not finish in %ss; where its tasks stood:\n' "$RUN_TIMEOUT" >&2
  RUN_ID="$(grep -o -m1 'manual__[0-9T:.+-]*' "$DAG_LOG" || true)"
  [[ -z "$RUN_ID" ]] || "$BIN/airflow" tasks states-for-dag-run maga_corpus_expansion "$RUN_ID" -o plain >&2 || true
  die "see $DAG_LOG and the task logs in $AIRFLOW_HOME/logs"
fi
[[ $DAG_STATUS -eq 0 ]] && grep -qE "DagRun Finished: .*, state=success," "$DAG_LOG" \
  || die "the DAG run did not succeed (exit $DAG_STATUS); see $DAG_LOG"

# -- 6. summary -------------------------------------------------------------------------
step "summary"
"$BIN/maga" status --registry "$REGISTRY" --recipe-id "$RECIPE_ID" >/dev/null
"$PY" scripts/demo.py report --registry "$REGISTRY" --recipe-id "$RECIPE_ID" --endpoint "$ENDPOINT" \
  --snapshot "$DEMO/logs/before.json" --output-root "$OUTPUT_ROOT" --airflow-logs "$AIRFLOW_HOME/logs" \
  --model-kind "$MODEL_KIND"
echo
echo "demo finished in $((SECONDS - STARTED))s. Run it again: nothing new is registered."
echo "See the run, its task logs and the corpus dashboard in the Airflow UI: make demo-ui"
echo "  (or MAGA_DEMO_DIR=$VAR bash scripts/demo.sh ui; the CLI: source $AIRFLOW_HOME/demo-env.sh)"
