"""Where things are, whatever the depth of the test module that asks."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Data files the tests read (real model answers, ...).
FIXTURES_DIR = REPO / "tests" / "fixtures"
