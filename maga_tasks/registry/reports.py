"""Which quality report files of a shard the dashboard serves, and as what (no web
framework here: the plugin turns the answer into a response).

A gate writes its reports under its shard's quality folder
`{output_root}/{recipe_id}/quality/{shard}/`: the compact result `{gate}.json` and, for a
Data Docs site, `{gate}/index.html` with its pages and styles beside it. A browser cannot
open those as `file://` links from an http page, so the dashboard serves them itself, and
only them: the folder is taken from the registry's own record of the shard's reports (a
link `report_link` accepts), never from the request, and the requested file must resolve
(symlinks followed) to a regular file inside that folder with a suffix of
`SERVED_TYPES`. Reports on S3 are not served (their links stay `s3://` URIs).

A Data Docs site's `index.html` builds its table with scripts from public CDNs, which the
dashboard neither may run (the pages hold values from the data) nor reach offline; its
validation and expectation pages are plain HTML. So a site is opened at its contents
(`data_docs_pages`): those pages, listed by the plugin.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.registry.dashboard import report_link
from maga_tasks.registry.registry import Registry

# What a gate's folder holds, and the content type each is served as (nothing is sniffed).
SERVED_TYPES = {
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ico": "image/x-icon",
    ".png": "image/png",
}
# The longest path asked for inside a quality folder (Data Docs nests about 6 levels).
MAX_RELATIVE_PATH = 400


class ReportNotServed(MagaError):
    """The request names no report file of this shard: answered 404, whatever the reason,
    so a probe learns nothing about the files around the corpus."""

    exit_code = EXIT_BAD_INPUT
    retryable = False


def shard_quality_folder(registry: Registry, recipe_id: str, shard: str) -> Path | None:
    """The local quality folder of a shard, from the newest report the registry holds
    for it that `report_link` accepts; None when it has none on local disk."""
    marker = f"/{recipe_id}/quality/{shard}/"
    for result in reversed(registry.quality_results(recipe_id, shard)):  # newest first
        uri = result.get("docs_uri")
        if report_link(uri, recipe_id, shard) is None:
            continue
        if "://" in uri:
            parts = urlsplit(uri)
            if parts.scheme != "file":
                continue  # S3: not on this machine
            uri = unquote(parts.path)
        root, _, _ = uri.rpartition(marker)
        return Path(root + marker)
    return None


def report_file(registry: Registry, recipe_id: str, shard: str, relative: str) -> tuple[Path, str]:
    """The file `relative` (e.g. `output.json`, `output/index.html`) of the shard's quality
    folder and its content type; `ReportNotServed` for anything else: an unknown shard, a
    path that climbs (`..`), is absolute or resolves outside the folder, a directory, a
    missing file or a suffix not in `SERVED_TYPES`."""
    parts = relative.split("/")
    if (
        not relative
        or len(relative) > MAX_RELATIVE_PATH
        or any(part in ("", ".", "..") or "\\" in part or "\x00" in part for part in parts)
    ):
        raise ReportNotServed(relative)
    media_type = SERVED_TYPES.get(Path(parts[-1]).suffix.lower())
    if media_type is None:
        raise ReportNotServed(relative)
    folder = shard_quality_folder(registry, recipe_id, shard)
    if folder is None:
        raise ReportNotServed(relative)
    base = folder.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise ReportNotServed(relative)
    return path, media_type


# A gate's name (`input`, `output`, `judge`): the folder of its Data Docs site.
_GATE = re.compile(r"^[a-z]+$")
# The most pages a contents listing shows (a gate's site holds one page per suite run).
MAX_LISTED_PAGES = 200


def data_docs_pages(registry: Registry, recipe_id: str, shard: str, gate: str) -> list[str]:
    """The plain-HTML pages of the shard's Data Docs site of `gate` (validation results,
    then expectation suites), relative to the site's folder; `ReportNotServed` when the
    shard has no such site."""
    folder = shard_quality_folder(registry, recipe_id, shard) if _GATE.fullmatch(gate) else None
    if folder is None:
        raise ReportNotServed(gate)
    site = (folder / gate).resolve()
    if not site.is_relative_to(folder.resolve()) or not (site / "index.html").is_file():
        raise ReportNotServed(gate)
    pages = []
    for section in ("validations", "expectations"):
        pages += sorted(
            path.relative_to(site).as_posix()
            for path in (site / section).rglob("*.html")
            if path.is_file() and path.resolve().is_relative_to(site)
        )
    return pages[:MAX_LISTED_PAGES]


__all__ = ["SERVED_TYPES", "ReportNotServed", "data_docs_pages", "report_file", "shard_quality_folder"]
