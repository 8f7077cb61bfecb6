"""The dashboard page alone in headless Chromium, against a loopback server that answers
its API with fixed documents (the shapes the plugin serves): optional figures the page
must render when present (the fidelity rates, per shard and per recipe, "—" when null),
and the API's hint when the registry is missing, shown as text. The plugin's own API is
checked against a real api-server in tests/e2e/test_dashboard.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.browser import chrome, require_browser
from tests.support.paths import REPO

pytestmark = [pytest.mark.browser, pytest.mark.integration]

PAGE = (REPO / "plugins" / "maga_corpus_dashboard.html").read_bytes()
SHARD = {
    "shard": "part-0000", "status": "registered", "documents": 4, "accepted": 15, "rejected": 5,
    "prompt_tokens": 900, "completion_tokens": 2400, "expansion_ratio": 3.1, "seconds": 76.4, "attempts": 1,
    "rejects_by_reason": {"off_genre": 3, "truncated": 2}, "quality": None,
    "airflow_task": {"dag_id": "maga_corpus_expansion", "task_id": "publish_shard", "map_index": 0,
                     "run_id": "manual__x", "try_number": 2,
                     "ui_path": "dags/maga_corpus_expansion/runs/manual__x/tasks/publish_shard/mapped/0"},
    "invented_fact_rate": 0.125, "label_echo_rate": None, "genre_kept_rate": 0.9,
}
TOTALS = {
    "registered_shards": 1, "by_status": {"registered": 1}, "documents": 4, "accepted": 15, "rejected": 5,
    "prompt_tokens": 900, "completion_tokens": 2400, "expansion_ratio": 3.1, "accepted_per_document": 3.75,
    "rejects_by_reason": {"off_genre": 3, "truncated": 2}, "genres": [], "audiences": [],
}
OVERVIEW = {
    "totals": TOTALS,
    "recipes": [{
        "recipe": {"recipe_id": "r-fidelity", "name": "demo", "prompt_version": "v2", "model": "m"},
        "totals": {**TOTALS, "invented_fact_rate": 0.125, "label_echo_rate": None, "genre_kept_rate": 0.9},
        "shards": [SHARD], "shards_not_shown": 0,
    }],
}
HINT = "no registry configured: set the connection 'maga_registry' or MAGA_REGISTRY_URL <b>here</b>"


class _Dashboard(BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, OVERVIEW)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/maga/":
            status, body, kind = 200, PAGE, "text/html; charset=utf-8"
        elif self.path.startswith("/maga/api/overview"):
            status, document = self.server.answer
            body, kind = json.dumps(document).encode(), "application/json"
        else:
            status, body, kind = 404, b"{}", "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    require_browser()
    driver = chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def load(driver, server) -> None:
    from maga_tasks.tools.airflow_stack import wait_for

    driver.get(f"http://127.0.0.1:{server.server_port}/maga/")
    wait_for(lambda: driver.execute_script(
        "return document.body.dataset.loaded === 'true' || !!document.getElementById('registry-error')"
    ), 30, 0.2, "the dashboard page")


def test_fidelity_rates_reject_rate_reasons_and_duration_are_shown(driver, page_server):
    from selenium.webdriver.common.by import By

    page_server.answer = (200, OVERVIEW)
    load(driver, page_server)
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-shard="part-0000"]')
    cells = {key: row.find_element(By.CSS_SELECTOR, f"td.{key}").text
             for key in ("invented_fact_rate", "label_echo_rate", "genre_kept_rate", "reject-rate", "duration")}
    assert cells == {"invented_fact_rate": "12.5%", "label_echo_rate": "—", "genre_kept_rate": "90.0%",
                     "reject-rate": "25.0%", "duration": "1 min 16 s"}
    assert "off_genre 3, truncated 2" in row.text.replace("\u00a0", " ")
    assert row.find_element(By.CSS_SELECTOR, "a.task").text == "part-0000 · try 2"
    headers = driver.find_element(By.CSS_SELECTOR, "section.recipe thead").text
    assert "invented facts" in headers and "label echoed" in headers and "genre kept" in headers
    assert driver.find_element(By.ID, "invented_fact_rate-r-fidelity").text.startswith("12.5%")
    assert driver.find_element(By.ID, "label_echo_rate-r-fidelity").text.startswith("—")


def test_without_the_fidelity_figures_there_are_no_such_columns(driver, page_server):
    from selenium.webdriver.common.by import By

    plain = {key: value for key, value in SHARD.items() if not key.endswith("_rate")}
    version = {**OVERVIEW["recipes"][0], "totals": TOTALS, "shards": [plain]}
    page_server.answer = (200, {**OVERVIEW, "recipes": [version]})
    load(driver, page_server)
    assert "invented facts" not in driver.find_element(By.CSS_SELECTOR, "section.recipe").text
    assert not driver.find_elements(By.ID, "invented_fact_rate-r-fidelity")


def test_a_missing_registry_shows_the_apis_hint_as_text(driver, page_server):
    from selenium.webdriver.common.by import By

    page_server.answer = (503, {"detail": HINT})
    load(driver, page_server)
    error = driver.find_element(By.ID, "registry-error")
    assert error.text == f"registry unavailable: HTTP 503: {HINT}"
    assert not error.find_elements(By.TAG_NAME, "b")


@pytest.mark.parametrize("genre_kept_share, shown", [(0.5, "50.0% kept their genre"), (None, None)])
def test_the_judges_genre_share_is_shown_beside_its_pass_share(driver, page_server, genre_kept_share, shown):
    from selenium.webdriver.common.by import By

    judged = {"success": False, "evaluated": 10, "failed": 2, "failed_expectations": [], "docs_uri": None,
              "report": None, "created_at": None, "pass_share": 0.8, "genre_kept_share": genre_kept_share}
    shard = {**SHARD, "quality": {"judge": judged}}
    page_server.answer = (200, {**OVERVIEW, "recipes": [{**OVERVIEW["recipes"][0], "shards": [shard]}]})
    load(driver, page_server)
    text = driver.find_element(By.CSS_SELECTOR, 'tr[data-shard="part-0000"]').text
    assert "80.0% of 10 judged scored ≥ 3" in text
    assert (shown in text) if shown else "kept their genre" not in text
