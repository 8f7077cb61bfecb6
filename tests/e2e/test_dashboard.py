"""The corpus dashboard plugin, served by a real Airflow api-server.

The registry is filled by the real pipeline (`publish_shard` against the test LLM
server) under a recipe of its own; the dashboard's API must return the registry's
figures, refuse unauthenticated requests, serve the shards' quality reports (result JSON,
Data Docs) behind the login with safe headers and nothing outside their folder, and the
page (inside the Airflow UI and on its own) must show the totals, rates, reasons and
durations in headless Chromium, with every report link followed and hostile labels shown
as text. The screenshots are kept under `artifacts/`.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.parse
import urllib.request

import pytest

from tests.support.airflow import ARTIFACTS, REPO, http_json, start_llm_server, wait_for
from tests.support.browser import chrome, open_dashboard, require_browser

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def published(airflow_stack, tmp_path_factory):
    """Two shards published by the library into the stack's registry, new recipe."""
    from maga_tasks.data.sample_corpus import write_sample_corpus
    from maga_tasks.engine.publish import publish_shard
    from maga_tasks.recipe import load_recipe, recipe_from_dict
    from maga_tasks.registry import Registry
    from maga_tasks.settings import RunSettings

    work = tmp_path_factory.mktemp("dashboard")
    files = write_sample_corpus(work / "corpus", shards=2, docs_per_shard=4, offset=400)
    recipe = recipe_from_dict({**load_recipe().model_dump(mode="json"), "name": "dashboard-test"})
    registry = Registry(airflow_stack.registry_url)
    registry.upgrade()
    llm = start_llm_server(work / "logs")
    try:
        for index, path in enumerate(files):
            # part-0000 keeps its full Data Docs site (production samples passing shards).
            settings = RunSettings(endpoints=(llm.url,), max_concurrency=8, data_docs_sample_rate=1.0 - index)
            publish_shard(
                str(path), str(work / "expanded"), recipe, settings, registry,
                owner=f"airflow:maga_corpus_expansion/publish_shard/{index}/manual__dashboard-test/try-1",
            )
    finally:
        llm.stop()
    return recipe.recipe_id, registry


# Labels and reasons come from model output: the page must show them as text.
HOSTILE_RECIPE = "r-escape-test"
HOSTILE_GENRE = '<img src=x onerror="window.__pwned=1"> a radio script read aloud by a presenter'
HOSTILE_AUDIENCE = '"><script>window.__pwned=2</script>'
HOSTILE_REASON = "<b onmouseover=window.__pwned=3>bold</b>"


@pytest.fixture(scope="module")
def hostile_labels(airflow_stack):
    """A registered shard whose labels and reject reason are markup."""
    from maga_tasks.data.outcome import ShardResult
    from maga_tasks.registry import Registry

    registry = Registry(airflow_stack.registry_url)
    registry.upgrade()
    result = ShardResult(
        shard="part-0000", source_uri="/src/part-0000.parquet", recipe_id=HOSTILE_RECIPE,
        data_uri="/out/data/part-0000.parquet", rejected_uri="/out/rejected/part-0000.parquet",
        documents=4, accepted=12, rejected=4, rejects_by_reason={HOSTILE_REASON: 4}, prompt_tokens=900,
        completion_tokens=2400, source_chars=4000, output_chars=12000, requests=20, seconds=75.5,
    )
    token = registry.lease(HOSTILE_RECIPE, "part-0000", result.source_uri, "airflow:x/publish_shard/0/r/try-2", 60)
    labels = {"genres": [[HOSTILE_GENRE, 7]], "audiences": [[HOSTILE_AUDIENCE, 5]]}
    assert registry.register(HOSTILE_RECIPE, "part-0000", result, "sha-x", label_summary=labels, token=token)
    registry.close()
    return HOSTILE_RECIPE


def test_api_returns_the_registry_figures(airflow_stack, published):
    recipe_id, registry = published
    token = airflow_stack.token()
    status, totals = http_json(f"{airflow_stack.api_url}/maga/api/totals?recipe_id={recipe_id}", token=token)
    assert status == 200, totals
    expected = registry.totals(recipe_id)
    assert totals["registered_shards"] == expected["registered_shards"] == 2
    keys = ("documents", "accepted", "rejected", "prompt_tokens", "completion_tokens", "expansion_ratio", "by_status")
    for key in keys:
        assert totals[key] == expected[key], key

    status, overview = http_json(f"{airflow_stack.api_url}/maga/api/overview?recipe_id={recipe_id}", token=token)
    assert status == 200, overview
    (version,) = overview["recipes"]
    assert version["recipe"]["recipe_id"] == recipe_id and version["recipe"]["name"] == "dashboard-test"
    assert version["totals"]["documents"] == expected["documents"] == 8
    assert version["totals"]["genres"] and version["totals"]["audiences"]
    shards = {row["shard"]: row for row in version["shards"]}
    assert set(shards) == {"part-0000", "part-0001"}
    for row in shards.values():
        assert row["status"] == "registered"
        assert row["quality"] and all(result["success"] for result in row["quality"].values())
        # Each gate links its JSON result, or its Data Docs for the sampled shard, all
        # through the plugin's report route (a browser does not follow file:// links).
        kinds = {suite: r["report"]["kind"] for suite, r in row["quality"].items()}
        sampled = row["shard"] == "part-0000"
        kind = "data_docs" if sampled else "json"
        assert kinds == {"input": kind, "output": kind}
        assert all(r["report"]["href"].startswith(f"maga/reports/{recipe_id}/{row['shard']}/")
                   for r in row["quality"].values())
        task = row["airflow_task"]
        assert task["dag_id"] == "maga_corpus_expansion" and task["task_id"] == "publish_shard"
        assert task["ui_path"].startswith("dags/maga_corpus_expansion/runs/")


def fetch(url: str, token: str | None = None):
    """(status, headers (case-insensitive), body) of a GET; never raises on 4xx/5xx."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_reports_are_served_behind_the_login_with_safe_headers(airflow_stack, published):
    recipe_id, _ = published
    token = airflow_stack.token()
    _, overview = http_json(f"{airflow_stack.api_url}/maga/api/overview?recipe_id={recipe_id}", token=token)
    links = [r["report"] for row in overview["recipes"][0]["shards"] for r in row["quality"].values()]
    assert len(links) == 4
    for link in links:
        url = f"{airflow_stack.api_url}/{link['href']}"
        status, headers, body = fetch(url, token)
        assert status == 200, (url, body[:300])
        assert headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        assert policy.startswith("sandbox") and "script-src 'none'" in policy and "allow-scripts" not in policy
        if link["kind"] == "json":
            assert headers["Content-Type"] == "application/json" and json.loads(body)
        else:  # the site's contents, then each of its pages
            assert headers["Content-Type"].startswith("text/html") and b"Data Docs of part-0000" in body
            pages = re.findall(r'<a class="page" href="([^"]+)"', body.decode())
            assert pages, body[:500]
            for page in pages:
                status, headers, _ = fetch(url + page, token)
                assert status == 200 and headers["Content-Type"].startswith("text/html"), page
                assert "sandbox" in headers["Content-Security-Policy"]
        assert fetch(url)[0] in (401, 403)  # no login, no report
        assert fetch(url, "not-a-jwt")[0] in (401, 403)
    # Nothing but the shard's own quality folder, however the path is spelled.
    base = f"{airflow_stack.api_url}/maga/reports/{recipe_id}"
    for path in (
        "part-0000/..%2Fpart-0001%2Foutput.json",
        "part-0000/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "part-0000/..%2F..%2F..%2Fdata%2Fpart-0000.parquet",
        "part-0000/%2Fetc%2Fpasswd",
        "part-0009/output.json",
        "part-0000/output",
    ):
        status, _, body = fetch(f"{base}/{path}", token)
        assert status in (400, 404), (path, status, body[:200])


@pytest.mark.parametrize("path", ["/maga/api/totals", "/maga/api/overview", "/maga/"])
def test_unauthenticated_requests_are_refused(airflow_stack, path):
    status, _ = http_json(f"{airflow_stack.api_url}{path}")
    assert status in (401, 403)
    status, _ = http_json(f"{airflow_stack.api_url}{path}", token="not-a-jwt")
    assert status in (401, 403)


def test_every_route_the_plugin_app_registers_refuses_unauthenticated_requests(airflow_stack):
    sys.path.insert(0, str(REPO / "plugins"))
    try:
        from maga_corpus_plugin import URL_PREFIX, dashboard_app
    finally:
        sys.path.pop(0)
    routes = {URL_PREFIX + route.path for route in dashboard_app.routes}
    # FastAPI's defaults: switched off (404) or behind the login, never open.
    defaults = {f"{URL_PREFIX}/docs", f"{URL_PREFIX}/redoc", f"{URL_PREFIX}/openapi.json"}
    answers = {path: http_json(f"{airflow_stack.api_url}{path}")[0] for path in sorted(routes | defaults)}
    assert routes and all(answers[path] in (401, 403) for path in routes), answers
    assert all(answers[path] in (401, 403, 404) for path in defaults), answers


def test_plugin_is_registered_with_the_ui(airflow_stack):
    status, body = http_json(f"{airflow_stack.api_url}/api/v2/plugins", token=airflow_stack.token())
    assert status == 200, body
    (plugin,) = [p for p in body["plugins"] if p["name"] == "maga_corpus"]
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/maga"
    assert plugin["external_views"][0]["url_route"] == "maga-corpus"


@pytest.mark.browser
def test_page_shows_the_totals_in_chromium(airflow_stack, published, hostile_labels, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By

    recipe_id, registry = published
    expected = registry.totals(recipe_id)
    ARTIFACTS.mkdir(exist_ok=True)
    driver = chrome(tmp_path / "chromium-profile")
    try:
        open_dashboard(driver, airflow_stack.api_url, airflow_stack.token(), timeout=30)
        section = driver.find_element(By.CSS_SELECTOR, f'section[data-recipe="{recipe_id}"]')
        documents = section.find_element(By.ID, f"documents-{recipe_id}").text
        assert f"{expected['documents']:,}" in documents
        registered = section.find_element(By.ID, f"registered-{recipe_id}").text
        assert registered.startswith(str(expected["registered_shards"]))
        assert "part-0000" in section.text and "registered" in section.text
        assert "Genres" in section.text and "Audiences" in section.text
        # Per shard: reject rate, reasons, duration; the task link named by shard and try.
        row = section.find_element(By.CSS_SELECTOR, 'tr[data-shard="part-0001"]')
        shard = registry.shard(recipe_id, "part-0001")
        rate = 100 * shard["rejected"] / (shard["accepted"] + shard["rejected"])
        assert row.find_element(By.CSS_SELECTOR, "td.reject-rate").text == f"{rate:.1f}%"
        assert row.find_element(By.CSS_SELECTOR, "td.duration").text.endswith(" s")
        for reason in shard["rejects_by_reason"] or {}:
            assert reason in row.text
        assert row.find_element(By.CSS_SELECTOR, "a.task").text == "part-0001 · try 1"
        json_links = section.find_elements(By.CSS_SELECTOR, "a.report.json")
        docs_links = section.find_elements(By.CSS_SELECTOR, "a.report.data_docs")
        assert len(json_links) == 2 and len(docs_links) == 2
        hrefs = [link.get_attribute("href") for link in json_links + docs_links]
        assert all(href.startswith(f"{airflow_stack.api_url}/maga/reports/{recipe_id}/") for href in hrefs)

        # Markup in labels and reasons is shown as text, in full, and never runs.
        hostile = driver.find_element(By.CSS_SELECTOR, f'section[data-recipe="{hostile_labels}"]')
        for text in (HOSTILE_GENRE, HOSTILE_AUDIENCE, HOSTILE_REASON):
            assert text in hostile.text
        assert driver.execute_script("return window.__pwned === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "section img, section script, section b")
        page_png = ARTIFACTS / "dashboard.png"
        driver.save_screenshot(str(page_png))
        assert page_png.stat().st_size > 10_000

        # Every report link, followed with the login cookie: served, and shown.
        for href in hrefs:
            driver.get(href)
            body = driver.find_element(By.TAG_NAME, "body").text
            if href.endswith(".json"):
                assert json.loads(body), href
                continue
            pages = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.page")]
            assert pages, body[:300]
            for page in pages:  # the site's validation and expectation pages
                driver.get(page)
                assert "Great Expectations" in driver.title, page
                assert len(driver.find_element(By.TAG_NAME, "body").text) > 100, page
            driver.save_screenshot(str(ARTIFACTS / "dashboard-data-docs.png"))

        # The same page inside the Airflow UI, through the plugin's nav entry.
        driver.get(f"{airflow_stack.api_url}/plugin/maga-corpus")

        def framed_page_loaded():
            frames = driver.find_elements(By.TAG_NAME, "iframe")
            if not frames:
                return False
            driver.switch_to.frame(frames[0])
            try:
                return driver.execute_script("return document.body && document.body.dataset.loaded === 'true'")
            finally:
                driver.switch_to.default_content()

        wait_for(framed_page_loaded, 60, 1.0, "the dashboard inside the Airflow UI")
        ui_png = ARTIFACTS / "dashboard-in-airflow-ui.png"
        driver.save_screenshot(str(ui_png))
        assert ui_png.stat().st_size > 10_000
    finally:
        driver.quit()
    print(f"screenshots: {page_png}, {ui_png} ({urllib.parse.quote(recipe_id)})")
