"""The quality reports the dashboard serves, straight from the registry and real gate
output (no web framework): the links point into the plugin's report route, and the route's
lookup serves only files of the shard's own quality folder, refusing a path that climbs
out, a symlink leading out, another shard's file, a folder, and a kind of file a gate does
not write."""

from __future__ import annotations

import os

import pytest

from maga_tasks.registry import Registry
from maga_tasks.registry.dashboard import corpus_overview
from maga_tasks.registry.reports import ReportNotServed, data_docs_pages, report_file
from tests.integration.test_dashboard_overview import RID, publish_committed

PREFIX = "maga/reports"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """part-0000 passes (its result JSON), part-0001 fails (its Data Docs site too); one
    SQLite registry for the module (the lookup reads through the Registry API, whose
    queries run on PostgreSQL in the registry tests)."""
    work = tmp_path_factory.mktemp("reports")
    registry = Registry(str(work / "registry.db"))
    registry.upgrade()
    publish_committed(work, registry, ["part-0000", "part-0001"], defective="part-0001")
    yield work / "out" / RID / "quality", registry
    registry.close()


def test_report_links_point_into_the_served_route(published):
    _, registry = published
    overview = corpus_overview(registry, recipe_id=RID, serve_prefix=PREFIX)
    rows = {row["shard"]: row for row in overview["recipes"][0]["shards"]}
    assert rows["part-0000"]["quality"]["output"]["report"]["href"] == f"{PREFIX}/{RID}/part-0000/output.json"
    # A Data Docs site opens at its contents (the folder), which the plugin lists.
    assert rows["part-0001"]["quality"]["output"]["report"]["href"] == f"{PREFIX}/{RID}/part-0001/output/"


def test_the_shards_own_reports_are_served_with_their_type(published):
    quality, registry = published
    path, media_type = report_file(registry, RID, "part-0000", "output.json")
    assert path == (quality / "part-0000" / "output.json").resolve() and media_type == "application/json"
    path, media_type = report_file(registry, RID, "part-0001", "output/index.html")
    assert path.is_file() and media_type.startswith("text/html")
    # The site's own pages and styles, linked relatively from its index.
    css = next((quality / "part-0001" / "output" / "static").rglob("*.css"))
    relative = css.relative_to(quality / "part-0001").as_posix()
    assert report_file(registry, RID, "part-0001", relative) == (css.resolve(), "text/css; charset=utf-8")


CLIMBING = [
    "../part-0001/output.json",  # another shard's report, by climbing
    "output/../../part-0001/output.json",
    "../../../../../etc/passwd",
    "/etc/passwd",
    "./output.json",
    "output//index.html",
    "..\\part-0001\\output.json",
    "output.json\x00.html",
    "output",  # a folder
    "missing.json",
]


def test_a_path_out_of_the_shards_folder_is_refused(published):
    _, registry = published
    for relative in CLIMBING:
        with pytest.raises(ReportNotServed):
            report_file(registry, RID, "part-0000", relative)


def test_what_is_not_a_report_of_this_shard_is_refused(published, tmp_path):
    quality, registry = published
    # A file the gates do not write, though inside the folder.
    (quality / "part-0000" / "notes.txt").write_text("not a report")
    # A symlink inside the folder leading out of it.
    secret = tmp_path / "secret.json"
    secret.write_text('{"key": "not yours"}')
    os.symlink(secret, quality / "part-0000" / "linked.json")
    for shard, relative in [
        ("part-0000", "notes.txt"),
        ("part-0000", "linked.json"),
        ("part-0000", "output/index.html"),  # part-0001's Data Docs, asked of part-0000
        ("part-0009", "output.json"),  # a shard the registry does not know
        ("../quality/part-0000", "output.json"),
    ]:
        with pytest.raises(ReportNotServed):
            report_file(registry, RID, shard, relative)
    with pytest.raises(ReportNotServed):
        report_file(registry, "r-other", "part-0000", "output.json")


def test_a_data_docs_site_lists_its_plain_pages(published):
    quality, registry = published
    pages = data_docs_pages(registry, RID, "part-0001", "output")
    assert pages and all(page.endswith(".html") for page in pages)
    assert any(page.startswith("validations/") for page in pages)
    for page in pages:  # each one served
        assert report_file(registry, RID, "part-0001", f"output/{page}")[1].startswith("text/html")
    for shard, gate in [("part-0000", "output"), ("part-0001", "input"), ("part-0001", ".."), ("part-0001", "")]:
        with pytest.raises(ReportNotServed):
            data_docs_pages(registry, RID, shard, gate)
