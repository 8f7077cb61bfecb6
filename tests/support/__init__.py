"""What the tests import: plain helpers, no fixtures (those are in the conftest.py files).

- `paths`: the repository and the test data folder.
- `servers`: free ports, waiting for HTTP, stopping process groups, the test PostgreSQL
  role, and the test LLM server's queue as its gauges show it.
- `cli`: the `maga` command line in a process of its own.
- `shards`: committed and source shards written as the pipeline writes them.
- `journal`: answer journal entries made by hand.
- `registry`: registry upgrades raced by real processes.
- `texts`: sample documents for the test LLM server's tests.
- `bench`: the short scale benchmark and the figures it must print.
- `vllm`: the tiny model's build script, recipe and server settings.
- `airflow`: the Airflow stack's pieces, its Celery workers, DAG runs and task logs.
- `browser`: headless Chromium for the page tests.
- `hostile_servers`: hostile hosts on loopback.

tests/conftest.py has pytest rewrite the asserts of this package.
"""
