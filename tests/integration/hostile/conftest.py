"""Fixtures of the hostile-edge cases."""

from __future__ import annotations

import pytest

from tests.support.airflow import new_airflow_env, remove_airflow_env
from tests.support.hostile_servers import RecordingServer


@pytest.fixture
def hostile_server():
    """A host on loopback that records every request it gets (the tests assert it got none)."""
    with RecordingServer() as server:
        yield server


@pytest.fixture(scope="module")
def quiet_airflow_env():
    """An Airflow environment of its own with no scheduler: `airflow dags test` runs every
    task in-process. On the session's environment a scheduler may be running (the e2e
    stack) and queue the tasks of a test run to Celery workers another test has stopped:
    a run refused at its sensor then waited for its summarize until the timeout."""
    af = new_airflow_env(pool_slots=4)
    try:
        yield af
    finally:
        remove_airflow_env(af)
