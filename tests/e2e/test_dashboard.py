"""The corpus dashboard plugin, served by a real Airflow api-server.

The registry is filled by the real pipeline (`publish_shard` against the test LLM
server) under a recipe of its own; the dashboard's API must return the registry's
figures, refuse unauthenticated requests, and the page (inside the Airflow UI and on
its own) must show the totals in headless Chromium. The screenshots are kept under
`artifacts/`.
"""

from __future__ import annotations

import sys
import urllib.parse

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
        settings = RunSettings(endpoints=(llm.url,), max_concurrency=8)
        for path in files:
            publish_shard(
                str(path), str(work / "expanded"), recipe, settings, registry,
                owner="airflow:maga_corpus_expansion/publish_shard/0/manual__dashboard-test",
            )
    finally:
        llm.stop()
    return recipe.recipe_id, registry


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
        # Passing shards outside the Data Docs sample: each gate links its JSON result.
        kinds = {suite: r["report"]["kind"] for suite, r in row["quality"].items()}
        assert kinds == {"input": "json", "output": "json"}
        task = row["airflow_task"]
        assert task["dag_id"] == "maga_corpus_expansion" and task["task_id"] == "publish_shard"
        assert task["ui_path"].startswith("dags/maga_corpus_expansion/runs/")


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
def test_page_shows_the_totals_in_chromium(airflow_stack, published, tmp_path):
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
        links = section.find_elements(By.CSS_SELECTOR, "a.report.json")
        assert len(links) == 4 and all(link.get_attribute("href").endswith(".json") for link in links)
        page_png = ARTIFACTS / "dashboard.png"
        driver.save_screenshot(str(page_png))
        assert page_png.stat().st_size > 10_000

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
