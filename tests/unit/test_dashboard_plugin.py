"""The dashboard plugin's own pieces, without an api-server: the answer when the registry
is missing says what to set, and the Data Docs contents it writes escape file names."""

from __future__ import annotations

import sys

import pytest
from fastapi import HTTPException

from tests.support.paths import REPO


@pytest.fixture(scope="module")
def plugin():
    sys.path.insert(0, str(REPO / "plugins"))
    try:
        import maga_corpus_plugin
    finally:
        sys.path.pop(0)
    return maga_corpus_plugin


def test_a_missing_registry_file_is_a_503_that_says_what_to_set(plugin, tmp_path, monkeypatch):
    missing = tmp_path / "expanded" / "_registry.sqlite"
    monkeypatch.setenv("MAGA_REGISTRY_URL", str(missing))
    with pytest.raises(HTTPException) as refused:
        plugin.open_registry()
    assert refused.value.status_code == 503
    assert str(missing) in refused.value.detail and "MAGA_REGISTRY_URL" in refused.value.detail
    assert not missing.exists()  # reported, not created empty


def test_data_docs_contents_escape_what_comes_from_file_names(plugin):
    page = plugin.data_docs_contents(
        "part-0000", "output", ['validations/<script>alert(1)</script>.html', 'expectations/a"b.html']
    )
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'href="validations/%3Cscript%3Ealert%281%29%3C/script%3E.html"' in page
    assert 'href="expectations/a%22b.html"' in page
    assert page.count('class="page"') == 2 and 'href="index.html"' in page

