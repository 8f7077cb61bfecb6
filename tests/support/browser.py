"""Headless Chromium for the page tests (the dashboard, Data Docs), driven by Selenium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def chrome(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,1200",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def require_browser() -> None:
    """Skip without a browser, unless MAGA_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    missing = []
    if not (CHROMIUM and CHROMEDRIVER):
        missing.append("chromium + chromedriver (apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        message = "the page tests need " + " and ".join(missing)
        if os.environ.get("MAGA_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def open_dashboard(driver, api_url: str, token: str, timeout: float = 60) -> None:
    """Log in the way the UI does (Airflow's JWT in the `_token` cookie), then load the
    corpus dashboard until its data is shown."""
    from maga_tasks.tools.airflow_stack import wait_for

    driver.get(f"{api_url}/api/v2/version")
    driver.add_cookie({"name": "_token", "value": token, "path": "/"})
    driver.get(f"{api_url}/maga/")
    wait_for(lambda: driver.execute_script("return document.body.dataset.loaded === 'true'"), timeout, 0.5,
             "the dashboard page")
