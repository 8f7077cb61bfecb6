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
