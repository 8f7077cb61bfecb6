#!/bin/bash
# Creates the MAGA registry database and its owner on the first start of the PostgreSQL
# container (files in /docker-entrypoint-initdb.d run once, on an empty data volume).
# Airflow's own metadata database is created by the image from POSTGRES_DB.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v maga_password="$MAGA_DB_PASSWORD" <<'SQL'
CREATE ROLE maga LOGIN PASSWORD :'maga_password';
CREATE DATABASE maga OWNER maga;
SQL
