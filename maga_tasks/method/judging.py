"""The method's quality measurement: an LLM judge scores a sample of a committed shard's
rewrites against their source documents.

The judge rates limited consistency from 1 to 5 (a rewrite may change style, focus and
order, drop or add information; it fails only when it is no longer recognisably derived
from its source). The headline figure is the share of scores >= 3. This is a measurement
beside the gates, not a gate: the shard's status does not depend on it; the result goes
to `quality/{shard}/judge.json` and, through the caller, to the registry (suite "judge")
where the dashboard shows it.

Where the recipe's judge task names the rewrite's genre (`{genre}`), the judge also says
whether the rewrite takes that genre's form (`genre_kept`): the genre check for genres a
model wrote, which no word check knows (`method/fidelity.py` checks the catalogue's). Its
share is reported beside the pass share, a flag on the sample, never a reject.

The sample is deterministic: the accepted rows with the smallest ids (ids are hashes, so
this is a uniform sample that a rerun picks again). Source documents are streamed and cut
to the context budget exactly as the expansion cut them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow.compute as pc
import pyarrow.parquet as pq

from maga_tasks.data.layout import shard_name, shard_paths
from maga_tasks.data.source import DEFAULT_COLUMNS, SourceColumns, open_shard
from maga_tasks.data.storage import ObjectNotFound, join, storage_for
from maga_tasks.errors import ShardInputError
from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.method.stages import StructuredOutputSupport, judge
from maga_tasks.method.truncation import DocumentCutter
from maga_tasks.recipe import Recipe
from maga_tasks.reject_reasons import RejectReason
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)

PASSING_SCORE = 3
_SAMPLE_COLUMNS = ["id", "source_id", "pair_index", "genre", "audience", "text"]


@dataclass
class JudgeReport:
    shard: str
    recipe_id: str
    sampled: int
    scores: dict[int, int] = field(default_factory=dict)  # score -> rows
    failures: dict[str, int] = field(default_factory=dict)  # reason -> rows without a score
    # The genre question's answers (recipes whose judge asks it): "kept" / "not_kept".
    genre_answers: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    min_pass_share: float = 0.0
    uri: str | None = None

    @property
    def scored(self) -> int:
        return sum(self.scores.values())

    @property
    def pass_share(self) -> float | None:
        """Share of scored samples with a score >= 3 (None when nothing was scored)."""
        if not self.scored:
            return None
        return sum(n for score, n in self.scores.items() if score >= PASSING_SCORE) / self.scored

    @property
    def genre_kept_share(self) -> float | None:
        """Share of the genre question's answers that say the rewrite keeps its genre."""
        answered = sum(self.genre_answers.values())
        return self.genre_answers.get("kept", 0) / answered if answered else None

    @property
    def success(self) -> bool:
        return self.pass_share is not None and self.pass_share >= self.min_pass_share

    def statistics(self) -> dict:
        scored = self.scored
        mean = sum(score * n for score, n in self.scores.items()) / scored if scored else None
        return {
            "sampled": self.sampled,
            "scored": scored,
            "pass_share": None if self.pass_share is None else round(self.pass_share, 4),
            "min_pass_share": self.min_pass_share,
            "mean_score": None if mean is None else round(mean, 3),
            "scores": {str(score): self.scores.get(score, 0) for score in range(1, 6)},
            "failures": dict(self.failures),
            "genre_kept_share": None if self.genre_kept_share is None else round(self.genre_kept_share, 4),
            "genre_answers": dict(self.genre_answers),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def judge_committed_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    *,
    sample: int,
    shard: str | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
) -> JudgeReport:
    """Judge up to `sample` accepted rewrites of a committed shard; writes judge.json.

    Raises `ShardInputError` when the shard is not committed or its source is gone, and
    `EndpointsUnavailable` when no LLM worker answers."""
    if sample < 1:
        raise ValueError(f"sample must be at least 1, not {sample}")
    s3 = settings.s3_endpoint_url
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    rows = _sample_rows(paths.data, sample, s3)
    sources = _source_texts(source_uri, {row["source_id"] for row in rows}, recipe, columns, s3)
    report = JudgeReport(paths.shard, recipe.recipe_id, len(rows), min_pass_share=recipe.quality.min_judge_pass_share)
    verdicts = run_client(_judge_rows(rows, sources, recipe, settings, paths.shard, report))
    samples = [
        {**{k: row[k] for k in _SAMPLE_COLUMNS if k != "text"}, **asdict(verdict)}
        for row, verdict in zip(rows, verdicts, strict=True)
    ]
    report.uri = join(paths.quality_docs, "judge.json")
    document = {"shard": paths.shard, "recipe_id": recipe.recipe_id, **report.statistics(), "samples": samples}
    storage_for(report.uri, s3).put_bytes(report.uri, json.dumps(document, indent=1, ensure_ascii=False).encode())
    log.info(
        "judge of shard %s: %d of %d samples scored, %s score >= %d (threshold %.0f%%), scores %s, genre kept %s",
        paths.shard, report.scored, report.sampled,
        "n/a" if report.pass_share is None else f"{report.pass_share:.1%}", PASSING_SCORE,
        100 * report.min_pass_share, report.statistics()["scores"],
        "n/a" if report.genre_kept_share is None else f"{report.genre_kept_share:.1%}",
    )
    return report


def _sample_rows(data_uri: str, sample: int, s3_endpoint_url: str | None) -> list[dict]:
    storage = storage_for(data_uri, s3_endpoint_url)
    try:
        with storage.local_copy(data_uri) as path:
            ids = pq.read_table(path, columns=["id"]).column("id")
            chosen = pc.sort_indices(ids)[:sample]
            wanted = ids.take(chosen)
            table = pq.read_table(path, columns=_SAMPLE_COLUMNS, filters=[("id", "in", wanted.to_pylist())])
    except ObjectNotFound:
        raise ShardInputError(f"shard is not committed: no {data_uri}") from None
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def _source_texts(
    source_uri: str, wanted: set[str], recipe: Recipe, columns: SourceColumns, s3_endpoint_url: str | None
) -> dict[str, str]:
    """The sampled rows' source documents, cut as the expansion cut them (streamed)."""
    if not wanted:
        return {}
    cutter = DocumentCutter(recipe.tokenizer_name, recipe.context_budget_tokens)
    found: dict[str, str] = {}
    try:
        with storage_for(source_uri, s3_endpoint_url).local_copy(source_uri) as path:
            for doc in open_shard(path, source_uri, columns):
                if doc.source_id in wanted and doc.text and doc.source_id not in found:
                    found[doc.source_id] = cutter.cut(doc.text)[0]
    except ObjectNotFound:
        raise ShardInputError(f"the source of the shard is gone: {source_uri}") from None
    return found


@dataclass
class _Verdict:
    score: int | None
    analysis: str
    failure: str | None
    genre_kept: bool | None = None


async def _judge_rows(rows, sources, recipe, settings, shard, report: JudgeReport) -> list[_Verdict]:
    structured = StructuredOutputSupport(recipe.pairs.structured_output)
    async with LLMClient(settings, recipe.model, model_revision=recipe.model_revision) as client:
        await client.wait_ready(settings.all_down_timeout_s, min_context_tokens=recipe.required_context_tokens)

        async def one(row: dict) -> _Verdict:
            source = sources.get(row["source_id"])
            if source is None:
                return _Verdict(None, "", RejectReason.JUDGE_SOURCE_MISSING)
            result = await judge(
                client, recipe, f"{shard}:{row['source_id']}", source, row["text"], row["pair_index"], structured,
                row["genre"], row["audience"],
            )
            return _Verdict(result.score, result.analysis, result.reject_reason, result.genre_kept)

        verdicts = await asyncio.gather(*(one(row) for row in rows))
        usage = client.stats.snapshot()
    report.prompt_tokens, report.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    report.scores = dict(Counter(v.score for v in verdicts if v.score is not None))
    report.failures = dict(Counter(v.failure for v in verdicts if v.score is None))
    report.genre_answers = dict(
        Counter("kept" if v.genre_kept else "not_kept" for v in verdicts if v.genre_kept is not None)
    )
    return verdicts


__all__ = ["PASSING_SCORE", "JudgeReport", "judge_committed_shard"]
