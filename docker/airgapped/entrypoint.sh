#!/usr/bin/env bash
# Entrypoint of the air-gapped Airflow base (Dockerfile.airflow): the subset of the
# official image's entrypoint contract that docker/docker-compose.yml uses.
#   - waits until `airflow db check` passes (CONNECTION_CHECK_MAX_COUNT tries,
#     CONNECTION_CHECK_SLEEP_TIME seconds apart; 0 tries skips the wait);
#   - _AIRFLOW_DB_MIGRATE=true: `airflow db migrate`;
#   - _AIRFLOW_WWW_USER_CREATE=true: creates the admin user from _AIRFLOW_WWW_USER_USERNAME
#     and _AIRFLOW_WWW_USER_PASSWORD (an existing user is kept);
#   - `bash ...` and `python ...` run as given; `airflow X ...` and `X ...` run `airflow X ...`;
#     the scheduler and Celery commands first wait for the Celery broker.
set -euo pipefail

command="${1:-}"
tries="${CONNECTION_CHECK_MAX_COUNT:-20}"
pause="${CONNECTION_CHECK_SLEEP_TIME:-3}"

if [[ "$(id -g)" != "0" ]]; then
    echo "ERROR: run the image with group 0 (any uid), e.g. --user 50000:0" >&2
    exit 1
fi
# Files created on shared volumes stay writable for any uid of group 0.
umask 0002

retry() {
    local left="$tries" output
    until output="$("$@" 2>&1)"; do
        left=$((left - 1))
        if (( left <= 0 )); then
            echo "ERROR: gave up after $tries tries of: $*" >&2
            echo "$output" | tail -n 5 >&2
            exit 1
        fi
        sleep "$pause"
    done
}

reachable() {  # URL: its host and port accept a TCP connection
    python - "$1" <<'PY'
import socket, sys
from urllib.parse import urlsplit
url = urlsplit(sys.argv[1])
defaults = {"redis": 6379, "rediss": 6379, "amqp": 5672, "postgresql": 5432, "postgres": 5432}
socket.create_connection((url.hostname or "localhost", url.port or defaults.get(url.scheme, 0)), 5).close()
PY
}

if (( tries > 0 )); then
    retry airflow db check
fi
if [[ -n "${_AIRFLOW_DB_MIGRATE:-}" ]]; then
    airflow db migrate
fi
if [[ -n "${_AIRFLOW_WWW_USER_CREATE:-}" ]]; then
    if [[ -z "${_AIRFLOW_WWW_USER_PASSWORD:-}" ]]; then
        echo "ERROR: _AIRFLOW_WWW_USER_CREATE needs _AIRFLOW_WWW_USER_PASSWORD" >&2
        exit 1
    fi
    # `|| true`: the user may exist already (the official entrypoint does the same).
    # `--password=`: a password that starts with "-" is not read as an option.
    airflow users create --role "${_AIRFLOW_WWW_USER_ROLE:-Admin}" \
        --username "${_AIRFLOW_WWW_USER_USERNAME:-admin}" \
        --password="${_AIRFLOW_WWW_USER_PASSWORD}" \
        --firstname "${_AIRFLOW_WWW_USER_FIRSTNAME:-Airflow}" \
        --lastname "${_AIRFLOW_WWW_USER_LASTNAME:-Admin}" \
        --email "${_AIRFLOW_WWW_USER_EMAIL:-airflowadmin@example.com}" || true
fi
unset _AIRFLOW_WWW_USER_PASSWORD

case "$command" in
    bash) shift; exec /bin/bash "$@" ;;
    python) shift; exec python "$@" ;;
    airflow) shift; command="${1:-}" ;;
esac
if [[ "$command" == scheduler || "$command" == celery ]] && (( tries > 0 )) \
    && [[ "$(airflow config get-value core executor)" == CeleryExecutor ]]; then
    retry reachable "$(airflow config get-value celery broker_url)"
fi
exec airflow "$@"
