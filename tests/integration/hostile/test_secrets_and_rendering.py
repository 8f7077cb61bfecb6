"""Hostile edges (issue 19): secrets never leave, stored error text is clean and bounded,
and nothing from data or model output renders as markup.

Every case is real: a test LLM server on loopback answering as a hostile proxy would
(`echo_auth`, `nul_5xx`), an endpoint URL carrying `user:password@`, the registry
on PostgreSQL, the `maga` command line as a process of its own, a Data Docs site rendered
by great_expectations, and the dashboard served by a real Airflow api-server, read as JSON
and in headless Chromium.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.publish import publish_shard
from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.quality import validate_input
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry
from maga_tasks.registry.store import MAX_STORED_TEXT
from maga_tasks.settings import RunSettings
from tests.support.servers import free_port
from tests.support.shards import write_source_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
# The key as an Airflow connection's password holds it: given to RunSettings, never in
# this process's environment (the CLI process gets it as MAGA_API_KEY).
KEY = f"sk-maga-{secrets.token_hex(12)}"
URL_PASSWORD = f"pw-{secrets.token_hex(8)}"
SECRETS = (KEY, URL_PASSWORD)
CONTROL = ("\x00", "\x1b", "\x07")


def fast(url: str, api_key: str | None) -> RunSettings:
    return RunSettings(
        endpoints=(url,), api_key=api_key, max_attempts=2, backoff_base_s=0, all_down_timeout_s=0.5,
        endpoint_probe_interval_s=0.1,
    )


def registry_dump(registry: Registry, recipe_id: str) -> str:
    """Everything the registry holds of a recipe's shards, as one text."""
    shards = registry.shards(recipe_id)
    rows = [
        {
            "shard": s,
            "events": registry.events(recipe_id, s["shard"]),
            "quality": registry.quality_results(recipe_id, s["shard"]),
        }
        for s in shards
    ]
    return json.dumps(rows, default=str, ensure_ascii=False)


def maga(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    """The `maga` command line in a process of its own (this tree first on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "MAGA_API_KEY"}
    if api_key:
        env["MAGA_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", *args], capture_output=True, text=True, env=env, timeout=300,
    )


def assert_clean(texts: dict[str, str], control: bool = True) -> None:
    for where, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret in {where}: {text[:2000]}"
        if control:
            for char in CONTROL:
                assert char not in text, f"{char!r} in {where}: {text[:2000]!r}"


# -- a hostile fleet: the key, a URL password, NUL bytes -------------------------------------

FLEET_CASES = [
    # A proxy answers 401 and quotes the request's Authorization header back.
    pytest.param(("echo_auth:1:inf",), "{url}", KEY, 1, id="401-body-echoes-the-bearer-key"),
    # 5xx whose body holds NUL bytes and escape sequences, behind an endpoint with user:password@.
    pytest.param(("nul_5xx:1:inf",), "http://maga:{password}@{host}", None, 1, id="5xx-NUL-body-user-password-url"),
    # Nothing listens: the all-down error names the endpoint.
    pytest.param(None, "http://maga:{password}@127.0.0.1:{dead_port}", None, 1, id="unreachable-user-password-url"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("faults", "endpoint", "api_key", "docs"), FLEET_CASES)
def test_a_hostile_fleet_leaks_no_secret_and_its_failure_is_recorded(
    tmp_path, pg_schema_url, llm_server_factory, caplog, capfd, faults, endpoint, api_key, docs
):
    server = llm_server_factory(*faults) if faults is not None else None
    url = endpoint.format(
        url=server.url if server else "", host=server.url.removeprefix("http://") if server else "",
        password=URL_PASSWORD, dead_port=free_port(),
    )
    source = str(write_sample_corpus(tmp_path / "source", 1, docs)[0])
    out = str(tmp_path / "out")
    registry = Registry(pg_schema_url)
    registry.upgrade()

    with caplog.at_level(logging.INFO), pytest.raises(EndpointsUnavailable) as failure:
        publish_shard(source, out, RECIPE, fast(url, api_key), registry, owner="w1")

    # The failed try is recorded on PostgreSQL (NUL bytes and all) and its lease released.
    row = registry.shard(RID, "part-0000")
    assert row["status"] == "planned" and row["lease_owner"] is None, row
    assert row["last_error"].startswith("endpoints unavailable") and len(row["last_error"]) <= MAX_STORED_TEXT
    assert [e["event"] for e in registry.events(RID, "part-0000")][-1] == "fail"

    # The same through the command line: one line on stderr, exit 3 (the fleet's fault).
    cli = maga("publish-shard", source, "--output-root", out, "--registry", pg_schema_url, "--endpoint", url,
               "--all-down-timeout", "1", api_key=api_key)
    assert cli.returncode == 3, cli.stderr[-3000:]
    assert "maga: error:" in cli.stderr and "Traceback" not in cli.stderr

    captured = capfd.readouterr()
    assert_clean({
        "the raised error (Airflow's record of the try)": str(failure.value),
        "the library's log": caplog.text,
        "this process's stdout/stderr": captured.out + captured.err,
        "the registry": registry_dump(registry, RID),
        "maga publish-shard's stderr": cli.stderr + cli.stdout,
    })


@pytest.mark.integration
def test_a_judge_refused_with_the_key_echoed_leaves_it_out_of_the_outcome(tmp_path, pg_schema_url, llm_server_factory):
    """The shard's outcome dict (its XCom) carries the judge's error: redacted."""
    server = llm_server_factory("echo_auth:1:inf:stage=judge")
    source = str(write_sample_corpus(tmp_path / "source", 1, 3)[0])
    registry = Registry(pg_schema_url)
    registry.upgrade()
    outcome = publish_shard(
        source, str(tmp_path / "out"), RECIPE, fast(server.url, KEY), registry, owner="w1", judge_sample=2
    )
    assert outcome["status"] == "registered" and "refuse" in outcome["judge_error"], outcome
    assert_clean({"the outcome dict": json.dumps(outcome, default=str), "the registry": registry_dump(registry, RID)})


# -- the registry's own boundary: whatever text it is given ----------------------------------

STORED_TEXTS = [
    pytest.param("upstream failed\x00\x00 at stage\x00 7", id="NUL-bytes"),
    pytest.param("\x1b[2J\x1b[31mred text\x07 and a bell", id="terminal-escapes"),
    pytest.param("x" * 50_000 + "\x00 end", id="50k-characters"),
    pytest.param(f"cannot connect: postgresql://maga:{URL_PASSWORD}@db:5432/registry", id="postgres-url-password"),
    pytest.param(f'{{"error": "denied", "headers": {{"Authorization": "Bearer {KEY}"}}}}', id="echoed-bearer-json"),
]


@pytest.mark.integration
@pytest.mark.parametrize("write", ["mark_failed", "quarantine"])
@pytest.mark.parametrize("text", STORED_TEXTS)
def test_the_registry_keeps_hostile_text_clean_and_bounded(pg_schema_url, text, write):
    registry = Registry(pg_schema_url)
    registry.upgrade()
    token = registry.lease(RID, "part-0000", "/src/part-0000.parquet", "w1", 60)
    if write == "mark_failed":
        assert registry.mark_failed(RID, "part-0000", text, owner="w1", max_failures=3, token=token) == "planned"
    else:
        failed = [{"check": "source_id_unique", "observed": text}]
        registry.quarantine(RID, "part-0000", text, failed, source_uri="/src/part-0000.parquet", token=token)
    row = registry.shard(RID, "part-0000")
    assert row["lease_owner"] is None and row["status"] == ("planned" if write == "mark_failed" else "quarantined")
    stored = row["last_error"]
    assert stored and len(stored) <= MAX_STORED_TEXT + 40  # and the marker saying how much was cut
    assert ("more characters cut" in stored) == (len(text) > MAX_STORED_TEXT)
    texts = {"last_error": stored, "the registry": registry_dump(registry, RID)}
    if write == "quarantine":  # `maga status` lists quarantined shards with their reason
        status = maga("status", "--registry", pg_schema_url)
        assert status.returncode == 0 and "part-0000" in status.stderr, status.stderr[-3000:]
        texts["maga status"] = status.stderr + status.stdout
    assert_clean(texts)


# -- Data Docs: hostile source ids are shown, never run ---------------------------------------

# name -> (source id, the script it would run)
HOSTILE_IDS = {
    "img-onerror": ('<img src=x onerror="window.__pwned=1">', "window.__pwned=1"),
    "script": ("<script>window.__pwned=2</script>", "window.__pwned=2"),
    "attribute-break": ('" autofocus onfocus="window.__pwned=3" x="', "window.__pwned=3"),
    "svg-onload": ("<svg/onload=window.__pwned=4>", "window.__pwned=4"),
}


class _Markup(HTMLParser):
    """The elements, attributes, script bodies and text of HTML pages."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def hostile_source_rows() -> list[dict]:
    text = "A plain document that is long enough for the length bounds of the input gate. " * 3
    rows = [{"id": f"doc-{i}", "text": text, "title": "t"} for i in range(6)]
    for hostile, _ in HOSTILE_IDS.values():  # each twice: the unique-id check lists it as unexpected
        rows += [{"id": hostile, "text": text, "title": "t"}, {"id": hostile, "text": text + " again", "title": "t"}]
    return rows


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> _Markup:
    """A real Data Docs site from a shard whose ids are markup (the input gate fails on them)."""
    root = tmp_path_factory.mktemp("docs")
    source = write_source_shard(root / "src" / "part-0000.parquet", hostile_source_rows())
    report = validate_input(source, RECIPE, shard_paths(str(root / "out"), RID, "part-0000"), data_docs_sample_rate=1.0)
    assert not report.success and report.data_docs_uri, report.failed_names
    pages = sorted(Path(report.data_docs_uri).parent.rglob("*.html"))
    assert len(pages) >= 2
    markup = _Markup()
    for page in pages:
        markup.feed(page.read_text(encoding="utf-8"))
    return markup


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_data_docs_show_a_hostile_id_as_text(data_docs, name):
    _, payload = HOSTILE_IDS[name]
    # GX's own buttons have onclick handlers; none may carry the id's script.
    live = [
        (tag, attrs) for tag, attrs in data_docs.tags
        if tag == "svg" or (tag == "img" and attrs.get("src") == "x")
        or any(payload in key or payload in (value or "") for key, value in attrs.items())
    ]
    assert not live, live
    assert not [body for body in data_docs.scripts if payload in body]
    assert payload in "".join(data_docs.text)  # shown to the reader, as text


# -- the dashboard: JSON API and the page in Chromium ------------------------------------------

HOSTILE_RECIPE = '<img src=x onerror="window.__pwned=5">'
HOSTILE_SHARD = '"><svg onload="window.__pwned=6">'
HOSTILE_OWNER = 'airflow:maga_corpus_expansion/publish_shard/0/"><img src=x onerror="window.__pwned=7">'
HOSTILE_LINKS = {
    "input": "javascript:window.__pwned=8//x/quality/y/input.json",
    "output": f"https://evil.example/{HOSTILE_RECIPE}/quality/{HOSTILE_SHARD}/output.json",
}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """An Airflow api-server with the plugin (no scheduler: the page needs none) over a
    registry on PostgreSQL holding a leaked-key failure, a shard quarantined for hostile
    ids with its Data Docs, and rows whose names, owner and links are markup."""
    pytest.importorskip("airflow")
    from maga_tasks.tools.test_server_process import TestServerProcess
    from tests.support.airflow import AIRFLOW, new_airflow_env, remove_airflow_env, start_process, wait_for

    work = tmp_path_factory.mktemp("dashboard")
    af = new_airflow_env()
    try:
        af.processes.append(start_process(
            "api-server", [AIRFLOW, "api-server", "--port", str(af.api_port), "--host", "127.0.0.1"], af.env,
            af.home / "process-logs",
        ))
        registry = Registry(af.registry_url)
        registry.upgrade()
        out = str(work / "out")
        llm = TestServerProcess(faults=("echo_auth:1:inf",), log_dir=work).start().wait_ready()
        try:
            leaked = str(write_sample_corpus(work / "source", 1, 1)[0])
            with pytest.raises(EndpointsUnavailable):
                publish_shard(leaked, out, RECIPE, fast(llm.url, KEY), registry, owner="w1")
        finally:
            llm.stop()
        hostile = write_source_shard(work / "source" / "part-0001.parquet", hostile_source_rows())
        quarantined = publish_shard(hostile, out, RECIPE, fast("http://127.0.0.1:9", KEY), registry, owner="w1")
        assert quarantined["status"] == "quarantined", quarantined
        registry.plan([("/src/hostile.parquet", HOSTILE_SHARD)], HOSTILE_RECIPE)
        registry.lease(HOSTILE_RECIPE, HOSTILE_SHARD, "/src/hostile.parquet", HOSTILE_OWNER, 3600)
        for suite, link in HOSTILE_LINKS.items():
            failed = [{"check": '<img src=x onerror="window.__pwned=9">', "observed": "\x1b[31m"}]
            registry.record_quality(HOSTILE_RECIPE, HOSTILE_SHARD, suite, False, {}, failed, link)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{af.api_url}/api/v2/monitor/health", timeout=3) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(healthy, 180, 1.0, "the api-server")
        yield af, quarantined
    finally:
        remove_airflow_env(af)


@pytest.mark.airflow
@pytest.mark.integration
def test_the_overview_api_serves_no_secret_and_no_foreign_link(dashboard):
    from tests.support.airflow import http_json

    af, quarantined = dashboard
    status, overview = http_json(f"{af.api_url}/maga/api/overview", token=af.token())
    assert status == 200, overview
    text = json.dumps(overview, ensure_ascii=False)
    assert_clean({"/maga/api/overview": text})
    versions = {v["recipe"]["recipe_id"]: v for v in overview["recipes"]}
    rows = {row["shard"]: row for row in versions[RID]["shards"]}
    assert "127.0.0.1" in rows["part-0000"]["last_error"]  # the failure is there, its key is not
    docs = rows["part-0001"]["quality"]["input"]["report"]
    # Served by the plugin behind the login, never as a file:// link.
    assert docs["kind"] == "data_docs" and docs["href"] == f"maga/reports/{RID}/part-0001/input/"
    (hostile,) = versions[HOSTILE_RECIPE]["shards"]
    assert {suite: result["report"] for suite, result in hostile["quality"].items()} == {"input": None, "output": None}


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.browser
def test_the_page_and_the_data_docs_run_no_markup_from_data(dashboard, tmp_path):
    from selenium.webdriver.common.by import By

    from tests.support.airflow import wait_for
    from tests.support.browser import chrome, open_dashboard, require_browser

    require_browser()
    af, quarantined = dashboard
    driver = chrome(tmp_path / "chromium-profile")
    try:
        open_dashboard(driver, af.api_url, af.token())
        assert driver.execute_script("return window.__pwned") is None
        assert not driver.find_elements(By.CSS_SELECTOR, "img, svg, [onerror], [onload], [onfocus]")
        # The hostile names are shown as text, under their own escaped id.
        section = driver.find_element(By.CSS_SELECTOR, f"section[data-recipe='{HOSTILE_RECIPE}']")
        assert HOSTILE_RECIPE in section.text and HOSTILE_SHARD in section.text
        shown = driver.execute_script(
            "return document.getElementById(arguments[0]).textContent", f"registered-{HOSTILE_RECIPE}"
        )
        assert shown.startswith("0")
        hrefs = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        contents = f"{af.api_url}/maga/reports/{RID}/part-0001/input/"
        assert contents in hrefs
        assert all(h.startswith((af.api_url + "/", "s3://")) for h in hrefs), hrefs

        # The quarantined shard's Data Docs, as the page links them: their contents, then a
        # validation page (served by the plugin, in a CSP sandbox).
        driver.get(contents)
        wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 60, 0.5, "contents")
        pages = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.page")]
        validation_page = next(h for h in pages if "/validations/" in h)
        driver.get(validation_page)
        wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 60, 0.5, "Data Docs")
        assert "window.__pwned=1" in driver.find_element(By.TAG_NAME, "body").text
        assert driver.execute_script("return window.__pwned") is None
        assert not driver.find_elements(By.CSS_SELECTOR, "img[src='x'], svg, [onerror], [onload], [onfocus]")
    finally:
        driver.quit()
