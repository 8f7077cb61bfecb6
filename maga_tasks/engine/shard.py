"""Expanding one source shard: documents stream through the stages under a bounded
number in flight, each finished document is checkpointed, and the checkpoint is
committed at the end (`engine.commit`, the staged commit and its fencing; the rows'
layout in `engine.rows`). `ShardResult` lives in `data.outcome` and is importable from
here too."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from typing import Callable

from maga_tasks.data.answer_journal import AnswerJournal, JournaledChat
from maga_tasks.data.checkpoint import Checkpoint, manifest
from maga_tasks.data.layout import trial_root
from maga_tasks.data.outcome import ShardResult
from maga_tasks.data.source import DEFAULT_COLUMNS, SourceColumns, SourceDocument, open_shard
from maga_tasks.data.storage import ObjectNotFound
from maga_tasks.engine.commit import CommitFence, committed_result, is_committed, source_limits, write_commit
from maga_tasks.engine.job import ShardJob
from maga_tasks.engine.rows import Draws, RowMaker
from maga_tasks.errors import ShardInputError
from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.method.cleaning import clean_rewrite
from maga_tasks.method.stages import StructuredOutputSupport, Usage, generate_pairs, rewrite
from maga_tasks.method.truncation import DocumentCutter
from maga_tasks.recipe import Recipe
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)

# How often a shard looks whether its lease was lost (a flag, no database call).
LEASE_POLL_S = 0.1


def documents_in_flight(max_concurrency: int) -> int:
    """How many documents a shard works on at once; a kill loses at most these.

    Twice the request slots: while some documents wait for their pairs, others
    already have rewrites queued, so no slot idles.
    """
    return 2 * max_concurrency


def expand_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    *,
    max_docs: int | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
    progress: Callable[[dict], None] | None = None,
    shard: str | None = None,
    fence: CommitFence | None = None,
) -> ShardResult:
    """Expand one source shard into `data/` and `rejected/` under the recipe's version.

    Idempotent: a committed shard is returned from its files without any LLM request; an
    interrupted one resumes from its checkpoint and never requests a finished document
    again, unless the source is another version than the checkpoint's (another
    content hash): then the shard starts afresh (`data.checkpoint`). Raises
    `ShardInputError` for an unusable shard (nothing is committed) and
    `EndpointsUnavailable` when every worker stays down (the checkpoint is kept).
    `shard` overrides the output name (default: from the file name), e.g. to keep
    daily drops that reuse file names apart. With `max_docs` it is a trial over the
    first documents, written under `trial_root` instead of the corpus.

    With `fence` (the lease it works under) a lost lease cancels the expansion within a
    heartbeat with the fence's error (`LeaseLost`), the checkpoint kept; the commit is
    staged under the lease's token and published only once the registry accepted it
    for that token (`engine.commit`), and the checkpoint is deleted only while the
    token still holds the shard.
    """
    if max_docs is not None:
        output_root = trial_root(output_root, max_docs)
    job = ShardJob.of(source_uri, output_root, recipe, shard=shard, columns=columns, settings=settings)
    return expand(job, settings, max_docs=max_docs, progress=progress, fence=fence)


def expand(
    job: ShardJob,
    settings: RunSettings,
    *,
    max_docs: int | None = None,
    progress: Callable[[dict], None] | None = None,
    fence: CommitFence | None = None,
) -> ShardResult:
    """`expand_shard` of a job built by the caller (a trial's job already names its
    `trial_root`; `max_docs` only bounds the documents)."""
    paths, source_uri, recipe = job.paths, job.source_uri, job.recipe
    out = job.storage()
    if is_committed(out, paths):
        log.info("shard %s already committed at %s; nothing to do", paths.shard, paths.data)
        return committed_result(source_uri, paths, out, recipe)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            local_source = stack.enter_context(job.source_storage().local_copy(source_uri))
        except ObjectNotFound as error:
            raise ShardInputError(str(error)) from None
        reader = stack.enter_context(open_shard(local_source, source_uri, job.columns, source_limits(recipe, settings)))
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
        run = _ShardRun(job, settings, checkpoint, total, done, progress, fence, journal)
        try:
            run_client(run.execute(itertools.islice(iter(reader), total)))
        finally:
            try:
                checkpoint.close()  # on S3 this also puts the journal's last snapshot
            finally:
                journal.close()
        result = write_commit(job, out, checkpoint, itertools.islice(iter(reader), total), identity, fence)
    result.requests = run.client_stats.get("requests", 0)
    result.failed_attempts = run.client_stats.get("failures", {})
    result.resumed_documents = len(done & set(range(total)))
    result.seconds = round(time.monotonic() - started, 3)
    if fence is None or fence.holds():
        checkpoint.clear()
    else:
        log.warning("shard %s: lease %d no longer holds it; its checkpoint is left to the owner",
                    paths.shard, fence.token)
    log.info(
        "shard %s committed: %d docs, %d accepted, %d rejected %s, %d+%d tokens, %d requests "
        "(failed attempts %s), %.1fs",
        paths.shard, result.documents, result.accepted, result.rejected, result.rejects_by_reason,
        result.prompt_tokens, result.completion_tokens, result.requests, result.failed_attempts, result.seconds,
    )
    return result


class _ShardRun:
    """The async part of one shard: documents stream through the stages, no batch barrier."""

    def __init__(self, job: ShardJob, settings, checkpoint, total, done, progress, fence=None, journal=None):
        recipe = self.recipe = job.recipe
        self.journal: AnswerJournal | None = journal
        self.settings = settings
        self.shard = job.shard
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
                await client.wait_ready(
                    self.settings.all_down_timeout_s, min_context_tokens=self.recipe.required_context_tokens
                )
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
        rows = RowMaker(self.recipe, self.shard, self.model, doc)
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
        drawn = await asyncio.gather(*(self._draw(chat, doc_key, text, i, pair) for i, pair in enumerate(pairs.pairs)))
        out = []
        for i, (pair, kept) in enumerate(zip(pairs.pairs, drawn, strict=True)):
            usage = pairs.usage if i == 0 else None
            result, verdict = kept.result, kept.verdict
            if verdict is None:
                out.append(rows.row(i, pair, None, None, usage, result.reject_reason, result.detail, draws=kept))
                continue
            out.append(
                rows.row(i, pair, verdict.text, result.completion, usage, verdict.reject_reason, verdict.detail,
                         verdict.keyword_coverage, verdict.invented_facts, draws=kept)
            )
        return out

    async def _draw(self, chat, doc_key: str, text: str, index: int, pair) -> Draws:
        """The pair's rewrite: drawn again (next seed) while the cleaning rejects it, up to
        the recipe's `rewrite.samples`; the first accepted one is kept, else the last.
        A request the fleet failed ends the drawing: another draw would meet the same fleet."""
        draws = Draws()
        for sample in range(self.recipe.rewrite.draws):
            result = await rewrite(chat, self.recipe, doc_key, text, index, pair, sample)
            if result.completion is None:
                if draws.result is None:  # no answer at all: the row carries the request's failure
                    draws.result, draws.samples = result, sample + 1
                return draws
            if draws.result is not None:  # the one drawn before is discarded: its tokens were spent
                draws.discarded.add(draws.result.completion.prompt_tokens, draws.result.completion.completion_tokens)
            completion = result.completion
            draws.result, draws.samples = result, sample + 1
            draws.verdict = clean_rewrite(
                text, completion.text, completion.finish_reason, self.recipe.cleaning, pair.genre, pair.audience
            )
            if draws.verdict.reject_reason is None:
                return draws
        return draws

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


__all__ = ["LEASE_POLL_S", "ShardResult", "describe_windows", "documents_in_flight", "expand", "expand_shard"]
