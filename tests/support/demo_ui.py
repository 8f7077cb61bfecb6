"""The demo's UI command (`scripts/demo.sh ui`, what `make demo-ui` runs) started on a
finished demo and checked as a new user would: log in, open the run's grid, one shard
task's log, and the corpus dashboard with every link followed (headless Chromium), with
the screenshots under `artifacts/`.

The UI process is stopped by its PID (its own process group), never by name.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from maga_tasks.tools.airflow_stack import ManagedProcess, free_port, http_json, start_process, wait_for
from tests.support.airflow import ARTIFACTS, DAG_ID, PROGRESS_LINE
from tests.support.paths import REPO

DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
_UP = re.compile(r"The Airflow UI is up: (http://127\.0\.0\.1:\d+)/")
_PASSWORD_FILE = re.compile(r"log in as admin, password in (\S+)")


def start_demo_ui(env: dict, log_dir: Path, timeout: float = 240) -> tuple[ManagedProcess, str, str]:
    """Start the UI command on the demo of `env`; (process, base URL, admin password)
    once it says it is up, read from where its output says."""
    process = start_process("demo-ui", ["bash", str(DEMO_SCRIPT), "ui"],
                            dict(env, MAGA_DEMO_UI_PORT=str(free_port())), log_dir)

    def up():
        if not process.alive():
            raise AssertionError(f"the UI command exited:\n{process.log_tail()}")
        return _UP.search(process.log_tail(20_000))

    try:
        url = wait_for(up, timeout, 1.0, "the demo UI to be up").group(1)
        password_file = _PASSWORD_FILE.search(process.log_tail(20_000)).group(1)
        password = json.loads(Path(password_file).read_text())["admin"]
    except BaseException:
        process.stop()
        raise
    return process, url, password


def fetch_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def login(url: str, password: str) -> str:
    status, body = http_json(f"{url}/auth/token", method="POST", body={"username": "admin", "password": password})
    assert status in (200, 201), (status, body)
    return body["access_token"]


def first_run(url: str, token: str) -> str:
    """The demo's first run: the one that expanded the shards (a second registers none)."""
    status, body = http_json(f"{url}/api/v2/dags/{DAG_ID}/dagRuns?order_by=run_after&limit=1", token=token)
    assert status == 200 and body["dag_runs"], body
    return body["dag_runs"][0]["dag_run_id"]


def task_log_events(url: str, token: str, run_id: str, task_id: str, map_index: int, try_number: int = 1) -> list[str]:
    """The task log as the UI reads it (the api-server's log endpoint)."""
    run = urllib.parse.quote(run_id, safe="")
    status, body = http_json(
        f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{run}/taskInstances/{task_id}/logs/{try_number}?map_index={map_index}",
        token=token,
    )
    assert status == 200, body
    return [str(line.get("event", "")) for line in body["content"]]


def check_demo_ui(url: str, password: str, profile_dir: Path, shard: str = "part-0000") -> dict:
    """Everything the demo's UI must show, in headless Chromium; returns what was followed."""
    from selenium.webdriver.common.by import By

    from tests.support.browser import chrome

    token = login(url, password)
    run_id = first_run(url, token)
    # The shard's log, as the api-server reads it from the demo's log folder.
    events = task_log_events(url, token, run_id, "publish_shard", 0)
    assert any(PROGRESS_LINE.search(event) for event in events), events[:40]
    assert not any("Could not read served logs" in event for event in events), events[:10]

    ARTIFACTS.mkdir(exist_ok=True)
    driver = chrome(profile_dir)
    followed: dict[str, int] = {}
    try:
        driver.get(f"{url}/api/v2/version")
        driver.add_cookie({"name": "_token", "value": token, "path": "/"})

        # The run's grid: the mapped shard task and its neighbours.
        driver.get(f"{url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}")
        wait_for(lambda: "publish_shard" in driver.find_element(By.TAG_NAME, "body").text, 90, 1.0,
                 "the run's grid")
        driver.save_screenshot(str(ARTIFACTS / "demo-ui-grid.png"))

        # One shard's task log, with the library's progress line.
        driver.get(f"{url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/publish_shard/mapped/0")
        wait_for(lambda: PROGRESS_LINE.search(driver.find_element(By.TAG_NAME, "body").text), 90, 1.0,
                 f"a progress line in the log of {shard}")
        driver.save_screenshot(str(ARTIFACTS / "demo-ui-task-log.png"))

        # The corpus dashboard on the demo's registry, then every link on it.
        driver.get(f"{url}/maga/")
        wait_for(lambda: driver.execute_script("return document.body.dataset.loaded === 'true'"), 60, 0.5,
                 "the dashboard")
        assert shard in driver.find_element(By.ID, "content").text
        driver.save_screenshot(str(ARTIFACTS / "demo-ui-dashboard.png"))
        reports = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.report")]
        tasks = [(a.get_attribute("href"), a.text) for a in driver.find_elements(By.CSS_SELECTOR, "a.task")]
        assert reports and tasks, driver.find_element(By.ID, "content").text[:2000]
        assert driver.find_elements(By.CSS_SELECTOR, "a.report.data_docs"), reports  # a Data Docs site
        for href in reports:
            assert href.startswith(f"{url}/maga/reports/"), href
            assert fetch_status(href, token) == 200, href
            assert fetch_status(href) in (401, 403), href  # not without the login
            driver.get(href)
            text = driver.find_element(By.TAG_NAME, "body").text
            followed[href] = 200
            if href.endswith(".json"):
                assert json.loads(text), href
                continue
            # A Data Docs site: its contents, then each of its pages.
            pages = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.page")]
            assert pages, text[:300]
            for page in pages:  # validation results first
                assert fetch_status(page) in (401, 403), page
                driver.get(page)
                assert "Great Expectations" in driver.title, page
                if page == pages[0]:
                    driver.save_screenshot(str(ARTIFACTS / "demo-ui-data-docs.png"))
                followed[page] = 200
        for href, label in tasks:
            assert re.fullmatch(r"part-\d{4} · try \d+", label), label
            driver.get(href)
            wait_for(lambda: "publish_shard" in driver.find_element(By.TAG_NAME, "body").text, 60, 1.0,
                     f"the task page of {label}")
            followed[href] = 200
    finally:
        driver.quit()
    return followed
