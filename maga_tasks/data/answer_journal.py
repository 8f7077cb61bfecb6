"""Answers of documents still in flight, kept until their document is checkpointed.

The checkpoint (`data.checkpoint`) holds finished documents; a document's six or more
requests finish one by one before it does. Without this journal a crash threw away the
answers of every document in flight, and the rerun asked for them again (10 of 394
requests in a kill -9 test). Each answer is kept here as it arrives, keyed by what
identifies the request: the document's index, the request id (stage, pair, attempt) and
a hash of everything the answer depends on (model, messages, sampling, seed, response
format: `request_digest`), so an answer is never replayed to a changed prompt, recipe or
source. On resume a request whose answer is in the journal is not sent.

Where it lives, like the checkpoint beside it in the shard's work folder (`prepare`
deletes both when the source or the recipe changed):
- local: `answers-{run}.jsonl`, a line written to the file as each answer arrives (a
  killed process loses none), fsync'd every `fsync_every` answers or `fsync_interval_s`
  after the oldest unsynced one, whichever comes first (power loss loses at most that).
  Once a document is checkpointed its lines are dead; when the file passes
  `compact_over_bytes` it is rewritten with the live lines only (temp file, fsync,
  rename), so it stays within that bound plus the answers of the documents in flight.
- S3 (no appends): one object per run, `answers-{run}.jsonl`, rewritten with the live
  answers each time the checkpoint puts a segment, through the checkpoint's own ordered
  uploader (`Checkpoint.add_companion`). A crash then loses the same window of answers
  the checkpoint loses (the last `s3_checkpoint_every` documents), for one PUT per
  segment, and the object never holds more than the documents in flight.

A rerun reads the earlier runs' journals, keeps the answers of documents not yet
checkpointed, writes them into its own journal and deletes the old files. What it
reads is model output (untrusted) and may be torn: each line is read to a bound
(`max_entry_bytes`, the largest answer the client would accept plus its keys), the
whole read to `max_read_bytes`, and every field is checked for type and range; a line
that fails (a torn last line included) is skipped, never an error: its request is asked
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from maga_tasks.data.checkpoint import Checkpoint, decode_json_line, encode_json_line
from maga_tasks.data.storage import LocalStorage, Storage, join
from maga_tasks.llm.answer import MAX_USAGE_TOKENS, answer_limit
from maga_tasks.llm.client import Completion

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "answers-"
FSYNC_EVERY = 64
FSYNC_INTERVAL_S = 1.0
COMPACT_OVER_BYTES = 64 * 1024**2
MAX_READ_BYTES = 512 * 1024**2
MAX_REQUEST_ID_CHARS = 4096
_DIGEST = re.compile(r"[0-9a-f]{32}")
_FINISH_REASON = re.compile(r"[A-Za-z0-9_.:-]{1,32}")  # as `llm.answer` accepts it


def request_digest(model: str, messages: list[dict], sampling, options: dict) -> str:
    """A hash of everything an answer depends on: the model, the messages, the sampling
    and the request's options (seed, response format, kind)."""
    material = [model, messages, sampling.model_dump(mode="json"), {k: options.get(k) for k in sorted(options)}]
    try:
        encoded = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # lone surrogates from a jsonl source: json escapes them
        encoded = json.dumps(material, sort_keys=True).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


@dataclass(frozen=True)
class JournalEntry:
    doc_index: int
    request_id: str
    digest: str
    completion: Completion


def _entry_of(record) -> JournalEntry | None:
    """The entry a decoded line holds, or None when any field is off (untrusted input)."""
    if not isinstance(record, dict):
        return None
    doc, request_id, digest = record.get("i"), record.get("r"), record.get("h")
    text, finish, prompt, completion = record.get("t"), record.get("f"), record.get("p"), record.get("c")
    if type(doc) is not int or doc < 0:
        return None
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        return None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest) or not isinstance(text, str):
        return None
    if not isinstance(finish, str) or not _FINISH_REASON.fullmatch(finish):
        return None
    if any(type(n) is not int or not 0 <= n <= MAX_USAGE_TOKENS for n in (prompt, completion)):
        return None
    return JournalEntry(doc, request_id, digest, Completion(text, finish, prompt, completion, 0, "journal"))


def _line_of(doc_index: int, request_id: str, digest: str, completion: Completion) -> bytes:
    return encode_json_line({
        "i": doc_index, "r": request_id, "h": digest, "t": completion.text, "f": completion.finish_reason,
        "p": completion.prompt_tokens, "c": completion.completion_tokens,
    })


def read_journal(path: Path, max_entry_bytes: int, budget: list[int]):
    """The entries of one journal file, each line read to `max_entry_bytes`; `budget`
    ([bytes left]) bounds the bytes read over several files. Torn, oversized and
    malformed lines are skipped."""
    with open(path, "rb") as handle:
        while budget[0] > 0:
            line = handle.readline(min(max_entry_bytes, budget[0]) + 1)
            if not line:
                return
            budget[0] -= len(line)
            if not line.endswith(b"\n"):
                if len(line) <= max_entry_bytes:
                    return  # the torn last line of a killed run
                while line and not line.endswith(b"\n") and budget[0] > 0:  # too long: skip to its end
                    line = handle.readline(min(1024**2, budget[0]))
                    budget[0] -= len(line)
                continue
            try:
                entry = _entry_of(decode_json_line(line))
            except (ValueError, RecursionError):
                continue
            if entry is not None:
                yield entry


class AnswerJournal:
    """The answers of one shard run's documents in flight (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        work_uri: str,
        *,
        max_entry_bytes: int,
        fsync_every: int = FSYNC_EVERY,
        fsync_interval_s: float = FSYNC_INTERVAL_S,
        compact_over_bytes: int = COMPACT_OVER_BYTES,
        max_read_bytes: int = MAX_READ_BYTES,
    ):
        self.storage = storage
        self.work_uri = work_uri
        self.max_entry_bytes = max_entry_bytes
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.compact_over_bytes = compact_over_bytes
        self.max_read_bytes = max_read_bytes
        self.uri = join(work_uri, f"{JOURNAL_PREFIX}{uuid.uuid4().hex[:12]}.jsonl")
        self._local = isinstance(storage, LocalStorage)
        self._gone = False  # local: the work folder was cleared under this run
        # Lines of documents not checkpointed yet: what a compaction or a snapshot keeps.
        self._live: dict[int, list[bytes]] = {}
        self._live_bytes = 0
        # Answers read from earlier runs, by document and request id.
        self._stored: dict[int, dict[str, JournalEntry]] = {}
        self._fd: int | None = None
        self._file_bytes = 0
        self._unsynced = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self._dirty = False  # S3: live answers changed since the last snapshot
        self.replayed = 0
        self.recorded = 0

    @classmethod
    def for_run(cls, storage: Storage, work_uri: str, recipe, settings) -> AnswerJournal:
        """A shard's journal, its lines bounded by the largest answer the client accepts
        for this recipe and these settings, plus room for the keys."""
        samplings = (recipe.pairs.sampling, recipe.rewrite.sampling, recipe.judge_sampling)
        longest = max(sampling.max_tokens for sampling in samplings)
        bound = answer_limit(longest, settings.answer_bytes_per_token, settings.answer_envelope_bytes) + 8192
        return cls(storage, work_uri, max_entry_bytes=bound)

    # -- resuming ---------------------------------------------------------------------

    def _journal_uris(self) -> list[str]:
        return [
            uri for uri in self.storage.list(self.work_uri)
            if (name := uri.rsplit("/", 1)[-1]).startswith(JOURNAL_PREFIX) and name.endswith(".jsonl")
        ]

    def load(self, done: set[int]) -> int:
        """Take in the earlier runs' answers of documents not in `done` (checkpointed),
        carry them into this run's journal and delete the old files; returns how many."""
        old = [uri for uri in self._journal_uris() if uri != self.uri]
        if not old:
            return 0
        budget = [self.max_read_bytes]
        for uri in old:
            with self.storage.local_copy(uri) as path:
                for entry in read_journal(path, self.max_entry_bytes, budget):
                    if entry.doc_index not in done:
                        line = _line_of(entry.doc_index, entry.request_id, entry.digest, entry.completion)
                        self._keep(entry.doc_index, line)
                        self._stored.setdefault(entry.doc_index, {})[entry.request_id] = entry
        if budget[0] <= 0:
            log.warning("answer journal at %s: read stopped at %d bytes; the rest is asked again",
                        self.work_uri, self.max_read_bytes)
        self._write_all()  # durable in our own journal before the old ones go
        for uri in old:
            self.storage.delete(uri)
        return sum(map(len, self._stored.values()))

    # -- during the run ---------------------------------------------------------------

    def stored_answer(self, doc_index: int, request_id: str, digest: str) -> Completion | None:
        """The stored answer to this very request (same id, same content), or None."""
        entry = self._stored.get(doc_index, {}).get(request_id)
        if entry is None or entry.digest != digest:
            return None
        self.replayed += 1
        return entry.completion

    def record(self, doc_index: int, request_id: str, digest: str, completion: Completion) -> None:
        """Keep an answer until its document is checkpointed (`forget`)."""
        line = _line_of(doc_index, request_id, digest, completion)
        self._keep(doc_index, line)
        self.recorded += 1
        if not self._local:
            self._dirty = True
            return
        if self._gone:
            return
        if self._fd is None:
            self._open()
        os.write(self._fd, line)  # in the kernel at once: a killed process loses nothing
        self._file_bytes += len(line)
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()
        elif self._sync_timer is None:
            try:
                self._sync_timer = asyncio.get_running_loop().call_later(self.fsync_interval_s, self.sync)
            except RuntimeError:  # called outside an event loop: nothing to wait with
                self.sync()
        if self._file_bytes > self.compact_over_bytes and self._live_bytes < self._file_bytes // 2:
            self._write_all()

    def forget(self, doc_index: int) -> None:
        """Its document is checkpointed: its answers are no longer needed."""
        lines = self._live.pop(doc_index, None)
        if lines:
            self._live_bytes -= sum(map(len, lines))
            self._dirty = True
        self._stored.pop(doc_index, None)

    def sync(self) -> None:
        """fsync what was written (local)."""
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def attach(self, checkpoint: Checkpoint) -> None:
        """On S3, put the live answers in step with the checkpoint's segments."""
        if not self._local:
            checkpoint.add_companion(self._snapshot)

    def _snapshot(self) -> tuple[str, bytes] | None:
        if not self._dirty:
            return None
        self._dirty = False
        return self.uri, self._live_body()

    def close(self) -> None:
        """Leave only the live answers (a failed run's rerun reads little); the
        checkpoint's `clear` deletes the journal with the work folder."""
        if self._local and self._fd is not None:
            if self._live:
                self._write_all()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not self._live:
                Path(self.uri).unlink(missing_ok=True)

    # -- files ------------------------------------------------------------------------

    def _keep(self, doc_index: int, line: bytes) -> None:
        self._live.setdefault(doc_index, []).append(line)
        self._live_bytes += len(line)

    def _live_body(self) -> bytes:
        return b"".join(line for lines in self._live.values() for line in lines)

    def _open(self) -> None:
        Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.uri, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _write_all(self) -> None:
        """Replace this run's journal with the live answers (compaction), durably."""
        body = self._live_body()
        if not self._local:
            if body:
                self.storage.put_bytes(self.uri, body)
            self._dirty = False
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        path = Path(self.uri)
        if not path.parent.is_dir():
            # The work folder is gone: another owner committed the shard and cleared it.
            # Nothing here is needed any more, and writing would bring the folder back.
            self._gone = True
            return
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        self._file_bytes, self._unsynced = len(body), 0
        self._open()


class JournaledChat:
    """`LLMClient.chat` for the stages of one document: an answer the journal holds for
    this very request is returned without asking; every new answer is journaled."""

    def __init__(self, client, journal: AnswerJournal, doc_index: int):
        self.client = client
        self.journal = journal
        self.doc_index = doc_index

    async def chat(self, messages: list[dict], sampling, *, request_id: str = "", **options) -> Completion:
        if not request_id:  # nothing to key it by
            return await self.client.chat(messages, sampling, **options)
        digest = request_digest(self.client.model, messages, sampling, options)
        stored = self.journal.stored_answer(self.doc_index, request_id, digest)
        if stored is not None:
            return stored
        completion = await self.client.chat(messages, sampling, request_id=request_id, **options)
        self.journal.record(self.doc_index, request_id, digest, completion)
        return completion
