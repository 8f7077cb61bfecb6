"""Expanding one source shard: stream documents, call the stages, checkpoint, commit."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.data.answer_journal import AnswerJournal, JournaledChat
from maga_tasks.data.checkpoint import Checkpoint, manifest
from maga_tasks.data.committed import files_checksum, local_files, read_measured
from maga_tasks.engine.figures import FIGURE_COLUMNS, FigureTally, ShardFigures, figures_of_files
from maga_tasks.method.cleaning import clean_rewrite
from maga_tasks.errors import MagaError, ShardInputError
from maga_tasks.data.layout import ShardPaths, shard_name, shard_paths, trial_root
from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.recipe import Recipe
from maga_tasks.data.schema import (
    ACCEPTED_SCHEMA, DUPLICATE_ID, MAGACORPUS_SCHEMA, REJECTED_SCHEMA, SOURCE_IDENTITY_KEY, magacorpus_row, row_id,
    source_identity_of,
)
from maga_tasks.settings import RunSettings
from maga_tasks.data.source import SourceColumns, SourceDocument, SourceLimits, open_shard
from maga_tasks.method.stages import StructuredOutputSupport, Usage, generate_pairs, rewrite
from maga_tasks.data.storage import ObjectNotFound, storage_for
from maga_tasks.method.truncation import DocumentCutter


# How often a shard looks whether its lease was lost (a flag, no database call).
LEASE_POLL_S = 0.1


class CommitFence(Protocol):
    """The lease a shard is expanded and committed under (`engine.lease.LeaseKeeper`).

    A worker whose lease was taken over stops within a heartbeat and publishes nothing:
    its token is stale, and the registry refuses the commit of a stale token."""

    token: int

    def lost(self) -> BaseException | None:
        """The error to stop with once the lease is lost, else None (a flag: cheap)."""

    def record_commit(self, checksum: str) -> None:
        """Record the commit's checksum for this token before anything is published;
        raises (`LeaseLost`) when the token is stale."""

    def holds(self) -> bool:
        """Whether this token still holds the shard (False too when the registry cannot
        say); asked before the checkpoint is deleted."""


def documents_in_flight(max_concurrency: int) -> int:
    """How many documents a shard works on at once; a kill loses at most these.

    Twice the request slots: while some documents wait for their pairs, others
    already have rewrites queued, so no slot idles.
    """
    return 2 * max_concurrency


@dataclass
class _ShardFiles:
    """Which shard a result is about and where its files went."""

    shard: str
    source_uri: str
    recipe_id: str
    data_uri: str
    rejected_uri: str


# The bases in this order put the file fields first and the figures after them, so
# `ShardResult(shard, source_uri, recipe_id, data_uri, rejected_uri, ...)` still holds.
@dataclass
class ShardResult(ShardFigures, _ShardFiles):
    """What one `expand_shard` call did; small enough to be an Airflow XCom."""

    requests: int = 0
    seconds: float = 0.0
    resumed_documents: int = 0
    already_committed: bool = False
    # The version of the source the rows were made from (`ShardReader.identity`).
    source_identity: str | None = None

    @classmethod
    def of(cls, paths: ShardPaths, source_uri: str, figures: ShardFigures, **run) -> ShardResult:
        """The result for a shard's `paths` with its figures (and `run` fields)."""
        return cls(paths.shard, source_uri, paths.recipe_id, paths.data, paths.rejected, **asdict(figures), **run)

    def to_dict(self) -> dict:
        """The XCom and progress report: every field, the expansion ratio and the request rate."""
        out = asdict(self)
        out["expansion_ratio"] = self.expansion_ratio
        out["requests_per_s"] = round(self.requests / self.seconds, 2) if self.seconds else 0.0
        return out


log = logging.getLogger(__name__)

# The key of the source identity in the parquet metadata of a committed shard's files.


def source_limits(recipe: Recipe, settings: RunSettings | None = None) -> SourceLimits:
    """The bounds on one source row for a run: the recipe's `max_source_chars`, the
    settings' `max_line_bytes` (None: derived from it)."""
    return SourceLimits(recipe.quality.max_source_chars, settings.max_line_bytes if settings else None)


def expand_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    *,
    max_docs: int | None = None,
    columns: SourceColumns = SourceColumns(),
    progress: Callable[[dict], None] | None = None,
    shard: str | None = None,
    fence: CommitFence | None = None,
) -> ShardResult:
    """Expand one source shard into `data/` and `rejected/` under the recipe's version.

    Idempotent: a committed shard is returned from its files without any LLM request; an
    interrupted one resumes from its checkpoint and never requests a finished document
    again, unless the source is another version than the checkpoint's (another
    content hash): then the shard starts afresh (`data.checkpoint`). Raises `ShardInputError` for an unusable shard (nothing is committed) and
    `EndpointsUnavailable` when every worker stays down (the checkpoint is kept).
    `shard` overrides the output name (default: from the file name), e.g. to keep
    daily drops that reuse file names apart. With `max_docs` it is a trial over the
    first documents, written under `trial_root` instead of the corpus.

    With `fence` (the lease it works under) a lost lease cancels the expansion within a
    heartbeat with the fence's error (`LeaseLost`), the checkpoint kept; the commit is
    staged under the lease's token and published only once the registry accepted it
    for that token (`_publish_fenced`), and the checkpoint is deleted only while the
    token still holds the shard.
    """
    if max_docs is not None:
        output_root = trial_root(output_root, max_docs)
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    out = storage_for(output_root, settings.s3_endpoint_url)
    if out.exists(paths.data) and out.exists(paths.rejected):
        log.info("shard %s already committed at %s; nothing to do", paths.shard, paths.data)
        return committed_result(source_uri, paths, out)
    started = time.monotonic()
    source = storage_for(source_uri, settings.s3_endpoint_url)
    with contextlib.ExitStack() as stack:
        try:
            local_source = stack.enter_context(source.local_copy(source_uri))
        except ObjectNotFound as error:
            raise ShardInputError(str(error)) from None
        reader = stack.enter_context(open_shard(local_source, source_uri, columns, source_limits(recipe, settings)))
        identity = reader.identity()
        total = reader.count() if max_docs is None else min(reader.count(), max_docs)
        checkpoint = Checkpoint(
            out, paths.work, manifest(recipe.recipe_id, source_uri, identity), settings.s3_checkpoint_every
        )
        checkpoint.prepare()
        with checkpoint.local_segments() as segments:
            done = set(Checkpoint.index(segments))
        journal = AnswerJournal.for_run(out, paths.work, recipe, settings)
        journal.attach(checkpoint)
        if carried := journal.load(done):
            log.info("shard %s: %d answers of unfinished documents kept from the last run", paths.shard, carried)
        run = _ShardRun(recipe, settings, paths.shard, checkpoint, total, done, progress, fence, journal)
        try:
            run_client(run.execute(itertools.islice(iter(reader), total)))
        finally:
            try:
                checkpoint.close()  # on S3 this also puts the journal's last snapshot
            finally:
                journal.close()
        result = _commit(source_uri, paths, out, checkpoint, itertools.islice(iter(reader), total), identity, fence)
    result.requests = run.client_stats.get("requests", 0)
    result.resumed_documents = len(done & set(range(total)))
    result.seconds = round(time.monotonic() - started, 3)
    if fence is None or fence.holds():
        checkpoint.clear()
    else:
        log.warning("shard %s: lease %d no longer holds it; its checkpoint is left to the owner", paths.shard, fence.token)
    log.info(
        "shard %s committed: %d docs, %d accepted, %d rejected %s, %d+%d tokens, %.1fs",
        paths.shard, result.documents, result.accepted, result.rejected,
        result.rejects_by_reason, result.prompt_tokens, result.completion_tokens, result.seconds,
    )
    return result


class _ShardRun:
    """The async part of one shard: documents stream through the stages, no batch barrier."""

    def __init__(self, recipe, settings, shard, checkpoint, total, done, progress, fence=None, journal=None):
        self.recipe = recipe
        self.journal: AnswerJournal | None = journal
        self.settings = settings
        self.shard = shard
        self.checkpoint = checkpoint
        self.total = total
        self.done = done
        self.progress = progress
        self.cutter = DocumentCutter(recipe.tokenizer_name, recipe.context_budget_tokens)
        self.model = settings.served_model or recipe.model
        self.finished = len(done & set(range(total)))
        self.accepted = 0
        self.rejects: Counter = Counter()
        self.client_stats: dict = {}
        self._started = time.monotonic()
        self.fence = fence
        self.stopped: BaseException | None = None  # why the lease watch cancelled the shard

    async def execute(self, documents) -> None:
        """Expand the documents; with a fence, cancelled once its lease is lost."""
        watch = asyncio.create_task(self._watch_lease(asyncio.current_task())) if self.fence else None
        try:
            await self._expand(documents)
        except asyncio.CancelledError:
            if self.stopped is None:
                raise
            raise self.stopped from None
        finally:
            if watch is not None:
                watch.cancel()

    async def _watch_lease(self, shard_task: asyncio.Task) -> None:
        while (error := self.fence.lost()) is None:
            await asyncio.sleep(LEASE_POLL_S)
        log.warning("shard %s: stopping, its lease is lost (%s); the checkpoint stays for the owner", self.shard, error)
        self.stopped = error
        shard_task.cancel()

    async def _expand(self, documents) -> None:
        async with LLMClient(self.settings, self.recipe.model, model_revision=self.recipe.model_revision) as client:
            self.client = client
            todo = self.total - self.finished
            if todo:
                await client.wait_ready(self.settings.all_down_timeout_s, min_context_tokens=self.recipe.required_context_tokens)
            structured = StructuredOutputSupport(self.recipe.pairs.structured_output)
            slots = asyncio.Semaphore(documents_in_flight(self.settings.max_concurrency))
            pending: set[asyncio.Task] = set()
            failures: list[BaseException] = []

            def finished(task: asyncio.Task, doc_index: int) -> None:
                slots.release()
                pending.discard(task)
                if task.cancelled():
                    return
                if task.exception() is not None:
                    failures.append(task.exception())
                    return
                rows = task.result()
                try:
                    self.checkpoint.append(doc_index, rows)
                except Exception as error:  # disk or S3 faults end the shard, never vanish in a callback
                    failures.append(error)
                    return
                if self.journal is not None:
                    self.journal.forget(doc_index)
                self._count(rows)

            ticker = asyncio.create_task(self._report_every(self.settings.progress_interval_s))
            try:
                for doc in documents:
                    if failures:
                        break
                    if doc.index in self.done:
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(self._document(client, doc, structured))
                    pending.add(task)
                    task.add_done_callback(lambda t, i=doc.index: finished(t, i))
                while pending and not failures:
                    await asyncio.wait(set(pending), return_when=asyncio.FIRST_EXCEPTION)
                if failures:
                    raise failures[0]
            finally:
                # On a failure, or when the shard is cancelled (its lease lost): no
                # request outlives the shard.
                for task in list(pending):
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                ticker.cancel()
                self.client_stats = client.stats.snapshot()
                self._report()
                if self.journal is not None and self.journal.replayed:
                    log.info("shard %s: %d answers taken from the journal instead of asked again",
                             self.shard, self.journal.replayed)

    async def _document(self, client: LLMClient, doc: SourceDocument, structured) -> list[dict]:
        rows = _RowMaker(self, doc)
        if doc.problem:
            return rows.all_rejected(doc.problem, doc.detail or "rejected before any model call", Usage())
        if len(doc.text) > 100_000:  # tokenizing a huge document must not stall the other requests
            text, cut_tokens = await asyncio.to_thread(self.cutter.cut, doc.text)
        else:
            text, cut_tokens = self.cutter.cut(doc.text)
        rows.source_truncated_tokens = cut_tokens
        doc_key = f"{self.shard}:{doc.source_id}"
        # Answers a crashed run already had are taken from the journal, not asked again.
        chat = JournaledChat(client, self.journal, doc.index) if self.journal is not None else client
        pairs = await generate_pairs(chat, self.recipe, doc_key, text, structured)
        if not pairs.pairs:
            return rows.all_rejected(pairs.reject_reason, pairs.detail, pairs.usage)
        results = await asyncio.gather(
            *(rewrite(chat, self.recipe, doc_key, text, i, pair) for i, pair in enumerate(pairs.pairs))
        )
        out = []
        for i, (pair, result) in enumerate(zip(pairs.pairs, results)):
            usage = pairs.usage if i == 0 else None
            if result.completion is None:
                out.append(rows.row(i, pair, None, None, usage, result.reject_reason, result.detail))
                continue
            verdict = clean_rewrite(
                text, result.completion.text, result.completion.finish_reason, self.recipe.cleaning, pair.genre, pair.audience
            )
            out.append(rows.row(i, pair, verdict.text, result.completion, usage, verdict.reject_reason, verdict.detail, verdict.keyword_coverage))
        return out

    def _count(self, rows: list[dict]) -> None:
        self.finished += 1
        for row in rows:
            if row["reject_reason"]:
                self.rejects[row["reject_reason"]] += 1
            else:
                self.accepted += 1

    def snapshot(self) -> dict:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        stats = self.client.stats.snapshot() if hasattr(self, "client") else {}
        return {
            "shard": self.shard,
            "documents_done": self.finished,
            "documents_total": self.total,
            "accepted": self.accepted,
            "rejected": sum(self.rejects.values()),
            "rejects_by_reason": dict(self.rejects.most_common()),
            "requests": stats.get("requests", 0),
            "retries": stats.get("retries", 0),
            "requests_per_s": round(stats.get("requests", 0) / elapsed, 2),
            "output_tokens_per_s": round(stats.get("completion_tokens", 0) / elapsed, 1),
            "elapsed_s": round(elapsed, 1),
            # Per endpoint: the adaptive window and the server's queue (empty: fixed cap).
            "windows": self.client.load_report() if hasattr(self, "client") else [],
        }

    def _report(self) -> None:
        snap = self.snapshot()
        log.info(
            "shard %s: %d/%d docs, %.1f req/s, %.0f tok/s out, accepted %d, rejected %d %s%s",
            snap["shard"], snap["documents_done"], snap["documents_total"], snap["requests_per_s"],
            snap["output_tokens_per_s"], snap["accepted"], snap["rejected"], snap["rejects_by_reason"],
            describe_windows(snap["windows"]),
        )
        if self.progress:
            self.progress(snap)

    async def _report_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._report()


def describe_windows(windows: list[dict]) -> str:
    """The progress line's tail: `, window 24 (server waiting 3)`, the endpoint named
    when there are several; empty with a fixed cap."""
    parts = []
    for w in windows:
        waiting = w["server_waiting"]
        if waiting is not None:
            queue = f"server waiting {waiting:g}"
        else:  # no metrics: the window follows latency, or nothing was read yet
            queue = "no server metrics, by latency" if w["signal"] == "latency" else "server load not read yet"
        where = f"{w['endpoint'].split('://')[-1]} " if len(windows) > 1 else ""
        parts.append(f"{where}window {w['window']} ({queue})")
    return (", " + ", ".join(parts)) if parts else ""


class _RowMaker:
    """Builds the output rows of one document (accepted and rejected share the columns)."""

    def __init__(self, run: _ShardRun, doc: SourceDocument):
        self.run = run
        self.doc = doc
        self.source_truncated_tokens = None
        self.created_at = datetime.now(timezone.utc).isoformat()

    def row(self, pair_index, pair, text, completion, pairs_usage, reason=None, detail="", coverage=None) -> dict:
        run, doc = self.run, self.doc
        return {
            # A repeated source id's rows carry the row's position: ids stay unique.
            "id": row_id(
                run.recipe.recipe_id, run.shard, doc.source_id, pair_index,
                doc.index if doc.problem == DUPLICATE_ID else None,
            ),
            "source_id": doc.source_id,
            "source_shard": run.shard,
            "pair_index": pair_index,
            "genre": pair.genre if pair else None,
            "audience": pair.audience if pair else None,
            "text": text,
            "recipe_id": run.recipe.recipe_id,
            "model": run.model,
            "prompt_version": run.recipe.prompt_version,
            "prompt_tokens": completion.prompt_tokens if completion else 0,
            "completion_tokens": completion.completion_tokens if completion else 0,
            "pairs_prompt_tokens": pairs_usage.prompt_tokens if pairs_usage else 0,
            "pairs_completion_tokens": pairs_usage.completion_tokens if pairs_usage else 0,
            "finish_reason": completion.finish_reason if completion else None,
            "keyword_coverage": coverage,
            "source_chars": len(doc.text) if isinstance(doc.text, str) else 0,
            "source_truncated_tokens": self.source_truncated_tokens,
            "source_meta": json.dumps(doc.meta, ensure_ascii=False, default=str) if doc.meta else None,
            "created_at": self.created_at,
            "reject_reason": reason,
            "reject_detail": detail or None,
        }

    def all_rejected(self, reason: str, detail: str, usage: Usage) -> list[dict]:
        """A document-level rejection: one rejected row per pair index, nothing lost."""
        return [
            self.row(i, None, None, None, usage if i == 0 else None, reason, detail)
            for i in range(self.run.recipe.pairs_per_document)
        ]


_COMMIT_BATCH_ROWS = 500


def _commit(
    source_uri: str, paths: ShardPaths, out, checkpoint: Checkpoint, documents, source_identity: str,
    fence: CommitFence | None = None,
) -> ShardResult:
    """Write rejected/, magacorpus/ and data/ from the checkpoint in source order.

    Each file is written atomically; data/ goes last since its presence marks the shard
    committed. `documents` streams the source again, in the same order, for raw_text.
    The files' parquet metadata name the source version (`SOURCE_IDENTITY_KEY`).
    With a fence the files are published by `_publish_fenced`.
    """
    identity = {SOURCE_IDENTITY_KEY: source_identity.encode()}
    tally = FigureTally()
    with checkpoint.local_segments() as segments, tempfile.TemporaryDirectory(prefix="maga-commit-") as tmp:
        locations = Checkpoint.index(segments)
        data_path, rejected_path = Path(tmp) / "data.parquet", Path(tmp) / "rejected.parquet"
        export_path = Path(tmp) / "magacorpus.parquet"
        with (
            _BatchedWriter(data_path, ACCEPTED_SCHEMA.with_metadata(identity)) as accepted,
            _BatchedWriter(rejected_path, REJECTED_SCHEMA.with_metadata(identity)) as rejected,
            _BatchedWriter(export_path, MAGACORPUS_SCHEMA.with_metadata(identity)) as export,
        ):
            for doc in documents:
                if doc.index not in locations:
                    raise MagaError(f"shard {paths.shard}: document {doc.index} is missing from the checkpoint")
                for row in Checkpoint.read(locations[doc.index]):
                    is_rejected = bool(row["reject_reason"])
                    tally.add(row, rejected=is_rejected, document=doc.index)
                    if is_rejected:
                        rejected.add(row)
                    else:
                        accepted.add(row)
                        export.add(magacorpus_row(row, doc.text))
        # The data file goes last: its presence is what marks the shard committed.
        built = {paths.rejected: rejected_path, paths.export: export_path, paths.data: data_path}
        if fence is not None:
            _publish_fenced(out, paths, built, fence)
        else:
            for uri, local in built.items():
                out.put_file(uri, local)
    return ShardResult.of(paths, source_uri, tally.figures(), source_identity=source_identity)


def commit_checkpoint(
    source_uri: str, paths: ShardPaths, out, *, columns: SourceColumns = SourceColumns(),
    s3_endpoint_url: str | None = None, limits: SourceLimits = SourceLimits(),
) -> ShardResult:
    """Commit a shard whose checkpoint (`_work/{shard}/`) holds every document of its
    source, without any LLM call: the commit step of `expand_shard` on its own (for
    `engine.publish.commit_and_validate`). `CheckpointMismatch` when the checkpoint was
    made from another version of the source."""
    with (
        storage_for(source_uri, s3_endpoint_url).local_copy(source_uri) as local,
        open_shard(local, source_uri, columns, limits) as reader,
    ):
        identity = reader.identity()
        checkpoint = Checkpoint(out, paths.work, {})
        checkpoint.check_source(identity)
        return _commit(source_uri, paths, out, checkpoint, iter(reader), identity)


def _publish_fenced(out, paths: ShardPaths, built: dict[str, Path], fence: CommitFence) -> None:
    """Stage the files under the lease's token, record the commit, then publish them.

    Staged files sit where no other lease writes (`ShardPaths.staged`). Nothing reaches
    `data/`, `rejected/` or `magacorpus/` before the registry accepted the commit for
    this token, so a stale lease stops with nothing published. From then on whoever holds
    the lease publishes these same staged bytes (`publish_staged`): a writer paused
    between the commit and its copies can only write bytes of the recorded checksum.
    """
    if (error := fence.lost()) is not None:
        raise error
    for staged, published in paths.staged(fence.token):
        out.put_file(staged, built[published])
    fence.record_commit(files_checksum(built[paths.data], built[paths.rejected]))
    publish_staged(out, paths, fence.token)


def publish_staged(out, paths: ShardPaths, token: int) -> None:
    """Copy the commit staged under lease `token` to its published places, `data/` last."""
    for staged, published in paths.staged(token):
        out.copy(staged, published)


class _BatchedWriter:
    def __init__(self, path: Path, schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.buffer: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= _COMMIT_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            for row in self.buffer:
                if "created_at" in row:
                    row["created_at"] = datetime.fromisoformat(row["created_at"])
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer.clear()

    def __enter__(self) -> "_BatchedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.writer.close()


def committed_result(source_uri: str, paths: ShardPaths, out) -> ShardResult:
    """The ShardResult of an already committed shard, read from its files batch by
    batch (texts measured, never kept)."""
    with local_files(out, paths.data, paths.rejected) as (data, rejected):
        tables = [read_measured(data, FIGURE_COLUMNS), read_measured(rejected, FIGURE_COLUMNS)]
        identity = source_identity_of(data)
    return ShardResult.of(
        paths, source_uri, figures_of_files(*tables), already_committed=True, source_identity=identity
    )
