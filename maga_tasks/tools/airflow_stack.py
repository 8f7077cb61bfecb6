"""Processes of a local Airflow stack, shared by the Airflow tests' fixtures and the
scale benchmark: free ports, PostgreSQL databases, managed child processes (each in a
session of its own, stopped by its PID), and the environment that points an isolated
AIRFLOW_HOME at a metadata database on PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
PLUGINS_FOLDER = REPO / "plugins"
PG_HOST = os.environ.get("MAGA_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MAGA_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("MAGA_TEST_PGUSER", "postgres")
REDIS_HOST = os.environ.get("MAGA_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MAGA_TEST_REDIS_PORT", "6379"))
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
ADMIN_USER = "admin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- PostgreSQL databases -------------------------------------------------------------


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


def create_pg_database(prefix: str) -> str:
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    import psycopg

    try:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as error:  # cleanup must not hide the caller's own result
        print(f"could not drop database {name}: {error}", file=sys.stderr)


def pg_url(dbname: str, driver: str = "postgresql") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


# -- processes ------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group we created for it, then SIGKILL what is left."""
        if self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # started with start_new_session: its own process group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def start_process(name: str, argv: list[str], env: dict, log_dir: Path) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as handle:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            argv,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(log_dir),
        )
    return ManagedProcess(name, popen, log_path)
