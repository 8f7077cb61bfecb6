"""The memory section of the scale benchmark (`tools.scale_bench`): gate + commit of one
synthetic expanded shard in a child process (`python -m maga_tasks.tools.scale_bench
_gate_child`), its peak RSS for many vs few documents."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from maga_tasks.reject_reasons import RejectReason
from maga_tasks.tools.benchmarks.figures import REPO, Figures
from maga_tasks.tools.benchmarks.registry_scale import SAMPLE_AUDIENCES, SAMPLE_GENRES
from maga_tasks.tools.benchmarks.services import BenchDatabase, open_registry

REWRITE_CHARS = 5000


def synthesize_expanded_shard(work: Path, recipe, documents: int) -> str:
    """A tiny source shard of `documents` documents and a complete checkpoint of its
    expansion (every pair rewritten, 5 KB each, one pair per document rejected), as an
    expansion that stopped just before its commit leaves them. Returns the source URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maga_tasks.data.checkpoint import Checkpoint, manifest
    from maga_tasks.data.layout import shard_paths
    from maga_tasks.data.schema import row_id
    from maga_tasks.data.source import open_shard
    from maga_tasks.data.storage import storage_for

    source = work / "source" / "part-000000.parquet"
    source.parent.mkdir(parents=True, exist_ok=True)
    # Sources of 3 KB: 5 KB rewrites of them keep the expansion ratio the output gate expects.
    body = "River deltas form where sediment settles as a current slows, and shift over centuries. " * 35
    texts = [f"Document {d}. {body}" for d in range(documents)]
    pq.write_table(pa.table({"id": [f"doc-{d:06d}" for d in range(documents)], "text": texts}), source)
    output_root = str(work / "out")
    paths = shard_paths(output_root, recipe.recipe_id, "part-000000")
    with open_shard(source, str(source)) as reader:
        identity = reader.identity()
    checkpoint = Checkpoint(storage_for(output_root), paths.work, manifest(recipe.recipe_id, str(source), identity))
    checkpoint.prepare()
    sentence = "River deltas form where a slowing current drops its sediment; they shift and feed wetlands. "
    rewrite = (sentence * (REWRITE_CHARS // len(sentence) + 1))[:REWRITE_CHARS]
    created = "2026-12-01T02:00:00+00:00"
    for d in range(documents):
        rows = []
        for p in range(recipe.pairs_per_document):
            rejected = p == recipe.pairs_per_document - 1
            rows.append({
                "id": row_id(recipe.recipe_id, paths.shard, f"doc-{d:06d}", p), "source_id": f"doc-{d:06d}",
                "source_shard": paths.shard, "pair_index": p, "genre": SAMPLE_GENRES[p % 5],
                "audience": SAMPLE_AUDIENCES[(p + d) % 5], "text": f"Rewrite {p} of document {d}. " + rewrite,
                "recipe_id": recipe.recipe_id, "model": recipe.model,
                "prompt_version": recipe.prompt_version, "prompt_tokens": 220, "completion_tokens": REWRITE_CHARS // 4,
                "pairs_prompt_tokens": 180 if p == 0 else 0, "pairs_completion_tokens": 150 if p == 0 else 0,
                "finish_reason": "stop", "keyword_coverage": 0.6, "source_chars": len(texts[d]),
                "source_truncated_tokens": None, "source_meta": None, "created_at": created,
                "reject_reason": RejectReason.LOW_KEYWORD_COVERAGE if rejected else None,
                "reject_detail": "coverage 0.05" if rejected else None,
            })
        checkpoint.append(d, rows)
    checkpoint.close()
    return str(source)


def gate_and_commit(source_uri: str, output_root: str, recipe, registry_url: str):
    """Commit and output gate of an already-expanded shard (`commit_and_validate`: its
    checkpoint to `data/`, `rejected/`, `magacorpus/`, then the gate, its result recorded
    in the registry); no lease, no LLM. The one call the memory section measures."""
    from maga_tasks.engine.publish import commit_and_validate

    registry = open_registry(registry_url)
    try:
        return commit_and_validate(source_uri, output_root, recipe, registry=registry)
    finally:
        registry.close()


def _gate_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("output_root")
    parser.add_argument("--registry", required=True)
    args = parser.parse_args(argv)
    from maga_tasks.recipe import load_recipe

    started = time.perf_counter()
    report = gate_and_commit(args.source, args.output_root, load_recipe(), args.registry)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "status": "passed" if report.success else "failed",
                      "reason": None if report.success else report.reason(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def memory_suite(sizes: dict, db: BenchDatabase, work: Path, figures: Figures) -> dict:
    from maga_tasks.recipe import load_recipe

    recipe = load_recipe()
    runs = {}
    for documents in sizes["docs"]:
        folder = work / f"gate-{documents}"
        source = synthesize_expanded_shard(folder, recipe, documents)
        done = subprocess.run(
            [sys.executable, "-m", "maga_tasks.tools.scale_bench", "_gate_child", source, str(folder / "out"),
             "--registry", db.schema_url("gate")],
            capture_output=True, text=True, cwd=REPO, timeout=3600, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"gate+commit child failed: {done.stderr.strip()[-3000:]}")
        runs[documents] = json.loads(done.stdout.strip().splitlines()[-1])
        figures.add(f"gate+commit peak RSS, {documents:,} documents", runs[documents]["peak_rss_mb"], "MiB")
        figures.add(f"gate+commit time, {documents:,} documents", runs[documents]["seconds"], "s")
    few, many = sizes["docs"]
    figures.add(f"gate+commit peak RSS ratio, {many:,} / {few:,} documents",
                runs[many]["peak_rss_mb"] / runs[few]["peak_rss_mb"], "x (mark <= 1.3)")
    return {"documents": list(sizes["docs"]), "rewrite_chars": REWRITE_CHARS,
            "pairs_per_document": recipe.pairs_per_document,
            "outcome": {str(d): r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
                        for d, r in runs.items()}}
